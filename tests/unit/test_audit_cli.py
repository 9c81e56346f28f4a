"""`medserve audit verify | export | tail | checkpoints` on a real log."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sqlite3
from pathlib import Path

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
