"""The throwaway PostgreSQL of tests/pg.py does what the other PostgreSQL tests rely on."""

from __future__ import annotations

import psycopg
import pytest

from tests import pg


def test_every_role_logs_in_with_its_password_and_only_with_it(pg_db: pg.PgDatabase) -> None:
    for role in (pg.SUPERUSER, *pg.ROLES):
        with psycopg.connect(pg_db.url(role)) as conn:
            row = conn.execute("SELECT current_user, current_database()").fetchone()
        assert row == (role, pg_db.name)
    wrong = pg_db.gateway_url.replace(pg_db.server.passwords[pg.GATEWAY], "not-the-password")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong).close()


def test_the_server_listens_on_no_network_interface(pg_db: pg.PgDatabase) -> None:
    with psycopg.connect(pg_db.superuser_url) as conn:
        row = conn.execute("SHOW listen_addresses").fetchone()
    assert row == ("",)


def test_each_database_is_fresh_and_owned_by_the_owner_role(pg_server: pg.PgServer) -> None:
    first, second = pg_server.database(), pg_server.database()
    try:
        with psycopg.connect(first.owner_url, autocommit=True) as conn:
            conn.execute("CREATE TABLE only_here (x int)")
            owner = conn.execute(
                "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s",
                (first.name,),
            ).fetchone()
        assert owner == (pg.OWNER,)
        with psycopg.connect(second.owner_url) as conn:
            found = conn.execute("SELECT to_regclass('only_here')").fetchone()
        assert found == (None,)
    finally:
        pg_server.drop(first)
        pg_server.drop(second)
