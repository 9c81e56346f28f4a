"""`medserve audit migrate | verify | export | tail | checkpoints --db postgresql://...` on a
real PostgreSQL, and the password in none of what they print."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from pathlib import Path

import psycopg
import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from medserve import audit
from medserve.audit import EventFacts, RequestFacts
from medserve.cli import app
from medserve.config import AuditSettings
from tests import pg

runner = CliRunner()


def cli(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["audit", *args])
    return result.exit_code, result.stdout, result.stderr


def no_password(db: pg.PgDatabase, *texts: str) -> None:
    for password in db.server.passwords.values():
        for text in texts:
            assert password not in text


@pytest.fixture
def filled(pg_db: pg.PgDatabase, audit_path: Path) -> pg.PgDatabase:
    """Two instances' chains (6 and 5 records) written through the configured store."""
    code, out, err = cli("migrate", "--db", pg_db.owner_url)
    assert code == 0, err
    no_password(pg_db, out, err)
    conf = AuditSettings(path=audit_path, url=SecretStr(pg_db.gateway_url), checkpoint_every=4)
    stores = [audit.open_configured(conf, name) for name in ("gw-a", "gw-b")]

    async def fill() -> None:
        for n, store in zip((6, 5), stores, strict=True):
            await store.append(EventFacts("server.start"))
            for i in range(n - 1):
                await store.append(RequestFacts(f"r{i}", "POST", "/v1/completions", 200))

    try:
        asyncio.run(fill())
    finally:
        for store in stores:
            store.close()
    return pg_db


def test_verify_says_intact_and_counts_every_chain(filled: pg.PgDatabase) -> None:
    code, out, err = cli("verify", "--db", filled.auditor_url)
    assert code == 0, err
    assert "intact: 11 records (2 instance chains)" in out
    no_password(filled, out, err)
    code, out, err = cli("verify", "--db", filled.auditor_url, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["heads"] == {"gw-a": 6, "gw-b": 5}  # each chain's head, no single last seq
    assert "last_seq" not in summary


def test_verify_names_the_instance_and_first_bad_record(filled: pg.PgDatabase) -> None:
    with psycopg.connect(filled.superuser_url, autocommit=True) as conn:
        conn.execute("DELETE FROM audit_records WHERE instance = 'gw-b' AND seq = 2")
    code, out, _ = cli("verify", "--db", filled.auditor_url, "--json")
    assert code == 1
    problem = json.loads(out)["problem"]
    assert (problem["instance"], problem["kind"], problem["seq"]) == ("gw-b", "deleted", 2)


def test_export_writes_every_chain_in_time_order(filled: pg.PgDatabase, tmp_path: Path) -> None:
    code, out, _ = cli("export", "--db", filled.auditor_url)
    assert code == 0
    items = [json.loads(line) for line in out.splitlines()]
    assert len(items) == 11
    assert sorted({i["instance_chain"] for i in items}) == ["gw-a", "gw-b"]
    assert [i["ts"] for i in items] == sorted(i["ts"] for i in items)
    target = tmp_path / "out.csv"
    code, _, _ = cli("export", "--db", filled.auditor_url, "--format", "csv", "--out", str(target))
    rows = list(csv.DictReader(io.StringIO(target.read_text(encoding="utf-8"))))
    assert code == 0 and len(rows) == 11 and rows[0]["instance_chain"] in ("gw-a", "gw-b")


def test_tail_prints_the_last_records(filled: pg.PgDatabase) -> None:
    code, out, _ = cli("tail", "--db", filled.auditor_url, "-n", "3")
    assert code == 0
    tail = [json.loads(line) for line in out.splitlines()]
    code, out, _ = cli("export", "--db", filled.auditor_url)
    everything = [json.loads(line) for line in out.splitlines()]
    assert tail == everything[-3:]


def test_checkpoints_exported_name_their_instance_and_peers(
    filled: pg.PgDatabase, tmp_path: Path
) -> None:
    target = tmp_path / "cp.jsonl"
    code, _, _ = cli("checkpoints", "--db", filled.auditor_url, "--out", str(target))
    assert code == 0
    lines = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    assert {line["instance"] for line in lines} == {"gw-a", "gw-b"}
    assert any("gw-a" in line["peers"] for line in lines if line["instance"] == "gw-b")
    # Everything of both instances removed: only the exported checkpoints still know.
    with psycopg.connect(filled.superuser_url, autocommit=True) as conn:
        for table in ("audit_records", "audit_checkpoints", "audit_instances"):
            conn.execute(f"DELETE FROM {table}".encode())
    code, out, _ = cli("verify", "--db", filled.auditor_url, "--checkpoints", str(target), "--json")
    assert code == 1
    assert json.loads(out)["problem"]["kind"] == "removed"


def test_a_wrong_password_fails_cleanly_without_showing_it(filled: pg.PgDatabase) -> None:
    password = filled.server.passwords[pg.AUDITOR]
    wrong = filled.auditor_url.replace(password, "Wr0ng-" + password)
    for command in ("verify", "export", "tail", "checkpoints"):
        code, out, err = cli(command, "--db", wrong)
        assert code == 2, command
        said = " ".join(err.split())  # rich wraps long lines
        assert "password authentication failed" in said and ":***@" in said
        assert "Wr0ng-" not in out + err
        no_password(filled, out, err)


def test_migrate_as_the_gateway_role_is_refused_and_says_how(pg_db: pg.PgDatabase) -> None:
    code, out, err = cli("migrate", "--db", pg_db.gateway_url)
    assert code == 2
    assert "may not change the schema" in " ".join(err.split())
    no_password(pg_db, out, err)
