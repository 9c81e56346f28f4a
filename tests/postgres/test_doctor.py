"""`medserve doctor` on a PostgreSQL audit log: reachable, schema version, the role's
rights, TLS across a network, and the password in no detail."""

from __future__ import annotations

import psycopg
import pytest
from pydantic import SecretStr

from medserve.audit.pgstore import open_schema
from medserve.auth.pgkeys import PgKeyStore
from medserve.config import AuditSettings, AuthSettings, Settings
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


def keys_checks(url: str) -> dict[str, Check]:
    settings = Settings(auth=AuthSettings(url=SecretStr(url)))
    found = checks(settings, [], hash_models=False, probe=True)
    return {c.name: c for c in found if c.name.startswith(("auth", "keys"))}


@pytest.mark.parametrize(
    ("role", "level"),
    [
        (pg.OWNER, "warn"),  # it may change or delete every key, as the audit role check says
        (pg.GATEWAY, None),  # reads the keys, writes only its own rows
        (pg.AUDITOR, None),  # reads only
    ],
)
def test_a_keys_role_that_could_change_keys_is_a_warning(
    pg_db: pg.PgDatabase, role: str, level: str | None
) -> None:
    PgKeyStore(pg_db.owner_url).create("ward-app")  # the schema, migrated by its owner
    found = keys_checks(pg_db.url(role))
    assert found["auth"].level in ("ok", "warn") and "1 active keys" in found["auth"].detail
    role_check = found.get("keys database role")
    if level is None:
        assert role_check is None, role_check
    else:
        assert role_check is not None and role_check.level == level
        assert "INSERT/UPDATE/DELETE/TRUNCATE" in role_check.detail
        assert pg_db.server.passwords[role] not in role_check.detail
