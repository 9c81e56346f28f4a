"""The HTTP side of keys in PostgreSQL, in process: a stale copy answers 503
``key_store_unavailable`` with Retry-After (never a pass), and /ready says not ready."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from medserve.api.app import create_app
from medserve.auth.pgkeys import PgKeyStore
from medserve.config import AuthSettings, Settings
from medserve.router import Router
from tests import pg
from tests.conftest import AUTH, DEV_KEY, fake_spec

pytest.importorskip("psycopg", reason="the postgres extra (psycopg) is not installed")

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
