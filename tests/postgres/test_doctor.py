"""`medserve doctor` on a PostgreSQL audit log: reachable, schema version, the role's
rights, TLS across a network, and the password in no detail."""

from __future__ import annotations

import psycopg
import pytest
from pydantic import SecretStr

from medserve.audit.pgstore import open_schema
from medserve.config import AuditSettings, Settings
from medserve.doctor import Check, checks
from tests import pg


def audit_checks(url: str, probe: bool = True) -> dict[str, Check]:
    settings = Settings(audit=AuditSettings(url=SecretStr(url)))
    found = checks(settings, [], hash_models=False, probe=probe)
    return {c.name: c for c in found if "audit" in c.name}


@pytest.fixture
def migrated(pg_db: pg.PgDatabase) -> pg.PgDatabase:
    with psycopg.connect(pg_db.owner_url, autocommit=True) as conn:
        open_schema(conn, pg_db.owner_url, gateway_role=pg.GATEWAY, auditor_role=pg.AUDITOR)
    return pg_db


def test_the_gateway_role_on_a_current_schema_is_ok(migrated: pg.PgDatabase) -> None:
    found = audit_checks(migrated.gateway_url)
    assert found["audit log"].level == "ok" and "(schema 1)" in found["audit log"].detail
    assert "audit database role" not in found
    assert migrated.server.passwords[pg.GATEWAY] not in found["audit log"].detail


def test_a_role_that_could_delete_records_is_a_warning(migrated: pg.PgDatabase) -> None:
    found = audit_checks(migrated.owner_url)
    assert found["audit database role"].level == "warn"
    assert "UPDATE/DELETE/TRUNCATE" in found["audit database role"].detail


def test_no_schema_or_no_connection_is_a_danger(pg_db: pg.PgDatabase) -> None:
    found = audit_checks(pg_db.gateway_url)
    assert found["audit log"].level == "danger" and "migrate" in found["audit log"].detail
    password = pg_db.server.passwords[pg.GATEWAY]
    found = audit_checks(pg_db.gateway_url.replace(password, "x" + password))
    assert found["audit log"].level == "danger"
    assert password not in found["audit log"].detail and "***" in found["audit log"].detail


@pytest.mark.parametrize(
    ("query", "level"),
    [("sslmode=disable", "danger"), ("", "warn"), ("sslmode=require", "warn")],
)
def test_clear_or_unverified_tls_across_a_network_is_named(query: str, level: str) -> None:
    found = audit_checks(f"postgresql://gw:pw@db.example:5432/medserve?{query}", probe=False)
    assert found["audit database TLS"].level == level


def test_verified_tls_or_a_local_socket_needs_no_tls_check() -> None:
    for url in (
        "postgresql://gw:pw@db.example/medserve?sslmode=verify-full",
        "postgresql://gw:pw@/medserve?host=/run/postgresql",
        "postgresql://gw:pw@127.0.0.1/medserve",
    ):
        assert "audit database TLS" not in audit_checks(url, probe=False), url
