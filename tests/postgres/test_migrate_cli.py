"""`medserve keys migrate` and `medserve audit migrate` say what happened, only that, on a
real PostgreSQL: every grant made, named; a configured role that does not exist is an
error before anything changes (a typo, most likely) unless --allow-missing-roles; a role
that may not grant (the gateway's, after the owner migrated) says it granted nothing."""

from __future__ import annotations

import psycopg
import pytest
from typer.testing import CliRunner

from medserve.cli import app
from tests import pg

CASES = [
    # name, role logging in, [audit] gateway_role, extra args, exit code, stdout has,
    # stdout lacks, stderr has
    (
        "owner",
        pg.OWNER,
        pg.GATEWAY,
        [],
        0,
        [f"granted {pg.GATEWAY}: SELECT", f"granted {pg.AUDITOR}: SELECT"],
        [],
        [],
    ),
    (
        "typo",
        pg.OWNER,
        "medserve_gw_typo",
        [],
        2,
        [],
        ["granted", "schema at version"],
        ["no such role in the database: medserve_gw_typo ([audit] gateway_role)"],
    ),
    (
        "typo allowed",
        pg.OWNER,
        "medserve_gw_typo",
        ["--allow-missing-roles"],
        0,
        [f"granted {pg.AUDITOR}: SELECT"],
        ["granted medserve_gw_typo", f"granted {pg.GATEWAY}"],
        ["no such role: medserve_gw_typo"],
    ),
    (
        "gateway role",
        pg.GATEWAY,
        pg.GATEWAY,
        [],
        2,
        [],
        ["granted"],
        ["nothing granted: the role this command logs in as may not grant"],
    ),
]


@pytest.mark.parametrize("command", ["keys", "audit"])
@pytest.mark.parametrize(
    ("name", "role", "gateway_role", "args", "code", "has", "lacks", "errors"),
    CASES,
    ids=[c[0] for c in CASES],
)
def test_migrate_says_what_it_did(
    pg_db: pg.PgDatabase,
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    name: str,
    role: str,
    gateway_role: str,
    args: list[str],
    code: int,
    has: list[str],
    lacks: list[str],
    errors: list[str],
) -> None:
    runner = CliRunner()
    if role != pg.OWNER:  # the owner migrated first; now another role runs migrate
        first = runner.invoke(app, [command, "migrate", "--db", pg_db.owner_url])
        assert first.exit_code == 0, first.stderr
    monkeypatch.setenv("MEDSERVE_AUDIT__GATEWAY_ROLE", gateway_role)
    done = runner.invoke(app, [command, "migrate", "--db", pg_db.url(role), *args])
    out, err = " ".join(done.stdout.split()), " ".join(done.stderr.split())
    assert done.exit_code == code, (out, err)
    for text in has:
        assert text in out, out
    for text in lacks:
        assert text not in out, out
    for text in errors:
        assert text in err, err
    for password in pg_db.server.passwords.values():
        assert password not in out + err
    if name == "typo":  # refused before anything changed
        with psycopg.connect(pg_db.owner_url) as conn:
            exists = conn.execute("SELECT to_regclass('schema_version')").fetchone()
        assert exists == (None,)
