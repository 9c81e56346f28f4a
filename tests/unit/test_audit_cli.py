"""`medserve audit verify | export | tail | checkpoints` on a real log."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from medserve.audit import EventFacts, RequestFacts, open_store
from medserve.cli import app
from medserve.config import AuditSettings

runner = CliRunner()


@pytest.fixture
def db(audit_path: Path) -> Path:
    store = open_store(AuditSettings(path=audit_path, checkpoint_every=4))

    async def fill() -> None:
        await store.append(EventFacts("server.start"))
        for i in range(11):
            await store.append(
                RequestFacts(f"r{i}", "POST", "/v1/completions", 200, model="fake-echo")
            )

    try:
        asyncio.run(fill())
    finally:
        store.close()
    return audit_path


def cli(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["audit", *args])
    return result.exit_code, result.stdout, result.stderr


def times(db: Path) -> list[str]:
    conn = sqlite3.connect(db)
    out = [ts for (ts,) in conn.execute("SELECT ts FROM records ORDER BY seq")]
    conn.close()
    return out


def test_verify_says_intact_and_exits_0(db: Path) -> None:
    code, out, _ = cli("verify", "--db", str(db))
    assert code == 0
    assert "intact: 12 records" in out


def test_verify_names_the_first_bad_record_and_exits_1(db: Path) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("DROP TRIGGER records_append_only_u")
    conn.execute("UPDATE records SET body = CAST(replace(CAST(body AS TEXT), 'r5', 'r6') AS BLOB)")
    conn.close()
    code, out, _ = cli("verify", "--db", str(db), "--json")
    assert code == 1
    problem = json.loads(out)["problem"]
    assert (problem["seq"], problem["kind"]) == (7, "altered")


def test_exported_checkpoints_reveal_a_truncation(db: Path, tmp_path: Path) -> None:
    kept = tmp_path / "elsewhere.jsonl"
    assert cli("checkpoints", "--db", str(db), "--out", str(kept))[0] == 0
    assert len(kept.read_text().splitlines()) == 3  # at seq 4, 8 and 12
    conn = sqlite3.connect(db, isolation_level=None)
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'"):
        conn.execute(f"DROP TRIGGER {name}")
    conn.execute("DELETE FROM records WHERE seq > 6")
    conn.execute("DELETE FROM checkpoints WHERE seq > 6")
    conn.close()
    code, out, _ = cli("verify", "--db", str(db), "--checkpoints", str(kept))
    assert code == 1
    assert "first bad seq 7: truncated" in out


def test_verify_with_a_missing_log_is_a_usage_error(tmp_path: Path) -> None:
    code, _, err = cli("verify", "--db", str(tmp_path / "nope.db"))
    assert code == 2 and "no audit log" in err


def test_export_a_time_range_as_jsonl_and_csv(db: Path) -> None:
    ts = times(db)
    code, out, _ = cli("export", "--db", str(db), "--since", ts[3], "--until", ts[9])
    assert code == 0
    seqs = [json.loads(line)["seq"] for line in out.splitlines()]
    assert seqs == [4, 5, 6, 7, 8, 9]
    code, out, _ = cli("export", "--db", str(db), "--format", "csv", "--since", ts[10])
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["seq"] for r in rows] == ["11", "12"]
    assert rows[0]["request_id"] == "r9" and rows[0]["status"] == "200"


def test_export_refuses_a_bad_time(db: Path) -> None:
    code, _, err = cli("export", "--db", str(db), "--since", "yesterday")
    assert code == 2 and "ISO 8601" in err


def test_tail_prints_the_last_records(db: Path) -> None:
    code, out, _ = cli("tail", "--db", str(db), "-n", "3")
    assert code == 0
    assert [json.loads(line)["seq"] for line in out.splitlines()] == [10, 11, 12]


def test_keygen_creates_private_keys_once(tmp_path: Path) -> None:
    key, signing = tmp_path / "k" / "audit.key", tmp_path / "k" / "signing.key"
    args = ("keygen", "--key", str(key), "--signing-key", str(signing))
    code, out, _ = cli(*args)
    assert code == 0 and out.count("created") == 2
    assert key.stat().st_mode & 0o777 == 0o600 and signing.stat().st_mode & 0o777 == 0o600
    assert signing.with_suffix(".pub").is_file()
    before = key.read_bytes()
    code, out, _ = cli(*args)
    assert code == 0 and out.count("kept") == 2 and key.read_bytes() == before


# Files the user names that cannot be used: one line naming the file and the fix, exit 2,
# never a traceback. "L" is a directory this user may not enter (chmod 000; as root, who
# ignores modes, the EACCES is injected at the OS boundary, os.stat / io.open, for paths
# under it); "LONG" a name the kernel refuses (ENAMETOOLONG, real for every user).
UNUSABLE = [
    ("audit verify --db {db} --key {L}/audit.key", "audit secret", "{L}/audit.key"),
    ("audit verify --db {db} --key {LONG}", "audit secret", "{LONG}"),
    ("audit verify --db {L}/audit.db", "audit log", "{L}/audit.db"),
    ("audit verify --db {db} --public-key {L}/s.pub", "public key", "{L}/s.pub"),
    ("audit verify --db {db} --checkpoints {L}/c.jsonl", "checkpoints", "{L}/c.jsonl"),
    ("audit hash {L}/text.txt --key {key}", "file", "{L}/text.txt"),
    ("audit hash {text} --key {L}/audit.key", "audit secret", "{L}/audit.key"),
    ("audit export --db {db} --out {L}/out.jsonl", "output file", "{L}/out.jsonl"),
    ("audit checkpoints --db {db} --out {L}/c.jsonl", "output file", "{L}/c.jsonl"),
    ("audit keygen --key {L}/new.key --signing-key {L}/s.key", "audit secret", "{L}/new.key"),
    ("keys list --db {L}/keys.db", "keys database", "{L}/keys.db"),
    ("keys list --config {L}/medserve.toml", "config file", "{L}/medserve.toml"),
]


@pytest.fixture
def locked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    import errno
    import os

    where = tmp_path / "locked"
    where.mkdir()
    for name in ("audit.key", "audit.db", "s.pub", "c.jsonl", "text.txt", "medserve.toml"):
        (where / name).write_text("x")
    if os.geteuid() != 0:
        where.chmod(0)
        yield where
        where.chmod(0o700)
        return

    def denied(path: Any) -> bool:
        return isinstance(path, (str, Path)) and str(path).startswith(f"{where}/")

    def guard(real: Any) -> Any:
        def call(path: Any, *args: Any, **kwargs: Any) -> Any:
            if denied(path):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real(path, *args, **kwargs)

        return call

    monkeypatch.setattr(os, "stat", guard(os.stat))
    monkeypatch.setattr(io, "open", guard(io.open))
    yield where


@pytest.mark.parametrize(("args", "what", "named"), UNUSABLE)
def test_an_unusable_file_is_one_line_with_the_fix_and_exit_2(
    args: str, what: str, named: str, db: Path, locked: Path, tmp_path: Path
) -> None:
    key = db.with_name("audit.key")
    text = tmp_path / "text.txt"
    text.write_text("hello")
    names = {"db": db, "L": locked, "LONG": tmp_path / ("x" * 300), "key": key, "text": text}
    result = runner.invoke(app, [a.format(**names) for a in args.split()])
    message = " ".join(result.stderr.split())
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert f"{what} " in message
    assert named.format(**names) in "".join(result.stderr.split())
    reason = "File name too long" if "{LONG}" in named else "Permission denied"
    assert reason in message
    if reason == "Permission denied":
        assert "runuser -u medserve" in message and "a user that may use it" in message
