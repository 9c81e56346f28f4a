"""medserve.pgsql on a real PostgreSQL: versioned migrations, applied once, refused clearly;
URLs shown without their password."""

from __future__ import annotations

import threading

import psycopg
import pytest

from medserve import pgsql
from tests import pg

V1 = "CREATE TABLE mig_a (x int)"
V2 = "CREATE TABLE mig_b (y int); INSERT INTO mig_b VALUES (1)"


def version(db: pg.PgDatabase) -> tuple[int, ...] | None:
    with psycopg.connect(db.superuser_url) as conn:
        return conn.execute(
            "SELECT version FROM schema_version WHERE component = 'test'"
        ).fetchone()


def test_pending_migrations_are_applied_in_order_and_only_once(pg_db: pg.PgDatabase) -> None:
    with pgsql.connect(pg_db.owner_url) as conn:
        assert pgsql.migrate(conn, "test", [V1]) == 1
        assert pgsql.migrate(conn, "test", [V1]) == 1  # nothing pending: V1 not rerun
        assert pgsql.migrate(conn, "test", [V1, V2]) == 2
    assert version(pg_db) == (2,)
    with psycopg.connect(pg_db.owner_url) as conn:
        assert conn.execute("SELECT count(*) FROM mig_b").fetchone() == (1,)


def test_gateways_starting_together_migrate_once(pg_db: pg.PgDatabase) -> None:
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def one() -> None:
        try:
            with pgsql.connect(pg_db.owner_url) as conn:
                start.wait(timeout=30)
                pgsql.migrate(conn, "test", [V1, V2])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    with psycopg.connect(pg_db.owner_url) as conn:
        assert conn.execute("SELECT count(*) FROM mig_b").fetchone() == (1,)


def test_a_newer_schema_and_a_role_that_cannot_migrate_are_refused(pg_db: pg.PgDatabase) -> None:
    with pgsql.connect(pg_db.owner_url) as conn:
        pgsql.migrate(conn, "test", [V1, V2])
        with pytest.raises(pgsql.SchemaError, match="version 2.*up to 1.*upgrade medserve"):
            pgsql.migrate(conn, "test", [V1])
    with psycopg.connect(pg_db.superuser_url, autocommit=True) as conn:
        conn.execute("GRANT SELECT ON schema_version TO medserve_gateway")
    with (
        pgsql.connect(pg_db.gateway_url) as conn,
        pytest.raises(pgsql.SchemaError, match="at version 2.*needs 3.*run this"),
    ):
        pgsql.migrate(conn, "test", [V1, V2, "CREATE TABLE mig_c (z int)"], migrate_hint="run this")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql://gw:s3cret@db:5432/m?sslmode=verify-full",
            "postgresql://gw:***@db:5432/m?sslmode=verify-full",
        ),
        (
            "postgresql://gw@db/m?password=s3cret&sslmode=require",
            "postgresql://gw@db/m?password=***&sslmode=require",
        ),
        ("postgresql://gw:s%40cret@/m?host=%2Ftmp", "postgresql://gw:***@/m?host=%2Ftmp"),
        ("postgresql://db/m", "postgresql://db/m"),
    ],
)
def test_redact_hides_the_password_and_keeps_the_rest(url: str, shown: str) -> None:
    assert pgsql.redact(url) == shown
    for secret in pgsql.passwords_of(url):
        assert pgsql.scrub(f"failed for {secret} and {secret.replace('%40', '@')}", url) == (
            "failed for *** and ***"
        )
