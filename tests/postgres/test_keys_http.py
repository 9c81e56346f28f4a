"""The HTTP side of keys in PostgreSQL, in process: a stale copy answers 503
``key_store_unavailable`` with Retry-After (never a pass), and /ready says not ready."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from typer.testing import CliRunner

from medserve.api.app import create_app
from medserve.audit.pgstore import open_schema
from medserve.auth.pgkeys import PgKeyStore
from medserve.cli import app as cli_app
from medserve.config import AuditSettings, AuthSettings, Settings
from medserve.router import Router
from tests import pg
from tests.conftest import AUTH, DEV_KEY, fake_spec

psycopg = pytest.importorskip("psycopg", reason="the postgres extra (psycopg) is not installed")

CHAT = "/v1/chat/completions"
BODY = {"model": "fake-echo", "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture
def app_client(pg_db: pg.PgDatabase) -> Iterator[tuple[TestClient, str]]:
    _, token = PgKeyStore(pg_db.owner_url).create("ward-app", rpm=100)
    settings = Settings(auth=AuthSettings(url=pg_db.gateway_url, dev_key=DEV_KEY))
    app = create_app(settings, Router.from_specs([fake_spec()]))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, token


def test_a_stale_copy_refuses_with_503_and_ready_says_so(
    app_client: tuple[TestClient, str],
) -> None:
    client, token = app_client
    headers = {"Authorization": f"Bearer {token}"}
    assert client.post(CHAT, json=BODY, headers=headers).status_code == 200
    ready = client.get("/ready", headers=AUTH)
    assert ready.status_code == 200 and ready.json()["keys"]["ok"] is True
    scrape = client.get("/metrics").text
    assert "medserve_rate_limit_check_seconds_count 1.0" in scrape
    age = next(line for line in scrape.splitlines() if line.startswith("medserve_keys_age"))
    assert 0 <= float(age.split()[1]) < 120
    store = client.app.state.security.store  # type: ignore[attr-defined]
    store.clock = lambda: 10**9  # the copy's last confirmation is now long past
    refused = client.post(CHAT, json=BODY, headers=headers)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "key_store_unavailable"
    assert int(refused.headers["retry-after"]) >= 1
    stale = client.get("/ready", headers=AUTH)  # the dev key needs no database
    assert stale.status_code == 503 and stale.json()["keys"]["ok"] is False
    assert (
        float(
            next(
                line.split()[1]
                for line in client.get("/metrics").text.splitlines()
                if line.startswith("medserve_keys_age")
            )
        )
        > 1000
    )


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_hand_edits_reach_the_audit_log_and_verify_names_a_hidden_one(
    pg_db: pg.PgDatabase, audit_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys and audit in one PostgreSQL: a DBA's un-revoke in psql reaches the gateway's
    audit log with who made it; a revoked key's 401 names the key; and a change hidden
    from every log with the gateway's credential (copy marks added by hand) is named by
    `medserve audit verify --db`."""
    import medserve.api.security as security

    monkeypatch.setattr(security, "JOURNAL_POLL_S", 0.05)
    with psycopg.connect(pg_db.owner_url, autocommit=True) as conn:
        open_schema(conn, pg_db.owner_url, gateway_role=pg.GATEWAY, auditor_role=pg.AUDITOR)
    admin = PgKeyStore(pg_db.owner_url)
    old, old_token = admin.create("old-app")
    admin.revoke(old.id)

    def pending() -> int:
        return len(admin.changes("gw-a"))

    def superuser(statement: str) -> None:
        with psycopg.connect(pg_db.superuser_url, autocommit=True) as conn:
            conn.execute(statement)

    settings = Settings(
        instance="gw-a",
        auth=AuthSettings(url=pg_db.gateway_url, dev_key=DEV_KEY),
        audit=AuditSettings(path=audit_path, url=SecretStr(pg_db.gateway_url)),
    )
    app = create_app(settings, Router.from_specs([fake_spec()]))
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_for(lambda: pending() == 0, "the journal copied")
        refused = client.post(CHAT, json=BODY, headers={"Authorization": f"Bearer {old_token}"})
        assert refused.json()["error"]["code"] == "key_revoked"
        superuser(f"UPDATE auth_keys SET revoked = NULL WHERE id = '{old.id}'")
        wait_for(lambda: pending() == 0, "the un-revocation copied")
    with psycopg.connect(pg_db.owner_url) as conn:
        bodies = [json.loads(bytes(b)) for (b,) in conn.execute("SELECT body FROM audit_records")]
    [request] = [b for b in bodies if b.get("endpoint") == CHAT]
    assert (request["status"], request["error"], request["key_id"]) == (401, "key_revoked", old.id)
    events = {b["event"]: b["details"] for b in bodies if b.get("event", "").startswith("key.")}
    assert set(events) == {"key.created", "key.revoked", "key.unrevoked"}
    assert events["key.unrevoked"]["db_user"] == pg.SUPERUSER
    assert events["key.revoked"]["db_user"] == pg.OWNER  # `medserve keys revoke`

    runner = CliRunner()
    intact = runner.invoke(cli_app, ["audit", "verify", "--db", pg_db.auditor_url, "--json"])
    assert intact.exit_code == 0, intact.stderr
    assert json.loads(intact.stdout)["unaudited_key_changes"] == []
    # With no gateway running, a deletion, hidden from gw-a's log by its credential.
    superuser(f"DELETE FROM auth_keys WHERE id = '{old.id}'")
    with psycopg.connect(pg_db.gateway_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO auth_copied (instance, n) SELECT 'gw-a', n FROM auth_journal "
            "ON CONFLICT DO NOTHING"
        )
    hidden = runner.invoke(cli_app, ["audit", "verify", "--db", pg_db.auditor_url, "--json"])
    assert hidden.exit_code == 0, hidden.stderr  # a note, not damage: see pgverify
    [n] = json.loads(hidden.stdout)["unaudited_key_changes"]
    assert f"#{n} key.deleted of key {old.id}" in " ".join(hidden.stderr.split())
