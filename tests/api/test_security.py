"""Who may ask what: a probe table of bypass attempts, scopes, roles, rate limits, key life."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from medserve.api.app import create_app
from medserve.auth import RateLimiter
from medserve.auth.keys import Key, KeyStore
from medserve.cli import app as cli_app
from medserve.config import Settings
from medserve.errors import RateLimitError
from medserve.router import Router
from tests.conftest import DEV_KEY, fake_spec

CHAT = "/v1/chat/completions"
BODY = {"model": "fake-echo", "messages": [{"role": "user", "content": "hello there"}]}


@dataclass
class Keys:
    user: str  # fake-echo only
    admin: str
    auditor: str
    revoked: str
    expired: str
    limited: str  # 1 request per minute
    user_id: str
    ids: dict[str, str]  # Keys attribute -> that key's id


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    store = KeyStore(tmp_path / "keys.db")  # the path the autouse fixture configured
    user_key, user = store.create("triage-app", "user", ["fake-echo"])
    admin_key, admin = store.create("ops", "admin")
    auditor_key, auditor = store.create("compliance", "auditor")
    gone, revoked = store.create("old-app", "user")
    store.revoke(gone.id)
    late, expired = store.create("pilot", "user", expires="2020-01-01T00:00:00.000000Z")
    limited_key, limited = store.create("notebook", "user", rpm=1)
    made = [user_key, admin_key, auditor_key, gone, late, limited_key]
    names = ["user", "admin", "auditor", "revoked", "expired", "limited"]
    ids = {name: key.id for name, key in zip(names, made, strict=True)}
    return Keys(user, admin, auditor, revoked, expired, limited, user_key.id, ids)


@pytest.fixture
def client() -> Iterator[TestClient]:
    specs = [fake_spec(), fake_spec(id="fake-other")]
    app = create_app(Settings(), Router.from_specs(specs))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def error(r: Any) -> tuple[int, str | None]:
    return r.status_code, r.json()["error"]["code"]


PROBES: list[tuple[str, str, str, Any, str | None, int, str]] = [
    # name, method, path, headers (str: a Keys attribute, dict: literal), body, status, code
    ("no header", "POST", CHAT, {}, "chat", 401, "missing_api_key"),
    (
        "basic scheme",
        "POST",
        CHAT,
        {"Authorization": "Basic dXNlcjpwYXNz"},
        "chat",
        401,
        "invalid_authorization",
    ),
    (
        "bearer without key",
        "POST",
        CHAT,
        {"Authorization": "Bearer"},
        "chat",
        401,
        "invalid_authorization",
    ),
    (
        "two tokens",
        "POST",
        CHAT,
        {"Authorization": "Bearer a b"},
        "chat",
        401,
        "invalid_authorization",
    ),
    ("unknown key", "POST", CHAT, bearer("ms-000000000000_nope"), "chat", 401, "invalid_api_key"),
    ("not a key", "POST", CHAT, bearer("sk-openai-style"), "chat", 401, "invalid_api_key"),
    ("wrong secret", "POST", CHAT, "user:wrong", "chat", 401, "invalid_api_key"),
    ("revoked key", "POST", CHAT, "revoked", "chat", 401, "key_revoked"),
    ("expired key", "POST", CHAT, "expired", "chat", 401, "key_expired"),
    (
        "key in the query string",
        "POST",
        CHAT + "?api_key={user}",
        {},
        "chat",
        401,
        "missing_api_key",
    ),
    ("key for another model", "POST", CHAT, "user", "other", 403, "model_not_permitted"),
    ("unknown model outside the scope", "POST", CHAT, "user", "nope", 403, "model_not_permitted"),
    ("auditor may not generate", "POST", CHAT, "auditor", "chat", 403, "role_not_permitted"),
    ("user may not drain", "POST", "/admin/drain", "user", None, 403, "role_not_permitted"),
    ("double slash without key", "GET", "//v1/models", {}, None, 401, "missing_api_key"),
    ("double slash with key", "GET", "//v1/models", "user", None, 404, "not_found"),
    ("dot-dot without key", "GET", "/v1/models/../v1/models", {}, None, 401, "missing_api_key"),
    # The client normalises dot segments: the server sees /admin, which does not exist.
    (
        "dot-dot out of /v1 with a key",
        "GET",
        "/v1/models/../../admin",
        "user",
        None,
        404,
        "not_found",
    ),
    ("unknown route without key", "GET", "/v1/secrets", {}, None, 401, "missing_api_key"),
    (
        "readiness details with a bad key",
        "GET",
        "/ready",
        "user:wrong",
        None,
        401,
        "invalid_api_key",
    ),
    ("schema needs a key", "GET", "/openapi.json", {}, None, 401, "missing_api_key"),
    ("other model card", "GET", "/v1/models/fake-other", "user", None, 403, "model_not_permitted"),
]


def headers_for(spec: Any, keys: Keys) -> dict[str, str]:
    if isinstance(spec, dict):
        return spec
    name, _, wrong = str(spec).partition(":")
    token = getattr(keys, name)
    return bearer(token[: token.index("_") + 1] + "x" * 43 if wrong else token)


@pytest.mark.parametrize(
    ("method", "path", "hdrs", "body", "status", "code"),
    [p[1:] for p in PROBES],
    ids=[p[0] for p in PROBES],
)
def test_bypass_attempts_are_refused(
    client: TestClient,
    keys: Keys,
    method: str,
    path: str,
    hdrs: Any,
    body: str | None,
    status: int,
    code: str,
) -> None:
    payload = {
        "chat": BODY,
        "other": {**BODY, "model": "fake-other"},
        "nope": {**BODY, "model": "nope"},
    }.get(body or "")
    r = client.request(
        method, path.format(user=keys.user), headers=headers_for(hdrs, keys), json=payload
    )
    assert error(r) == (status, code), r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    if status == 401:
        assert r.headers["www-authenticate"].startswith("Bearer")
    for token in (keys.user, keys.admin, keys.revoked):
        assert token.partition("_")[2] not in r.text


READINESS = [  # (who asks, the body's keys): a probe without a key gets the status only
    ("no key", {"status"}),
    ("user", {"status", "models", "audit"}),
    ("auditor", {"status", "models", "audit"}),
]


@pytest.mark.parametrize(("who", "fields"), READINESS)
def test_readiness_without_a_key_is_the_status_alone(
    client: TestClient, keys: Keys, who: str, fields: set[str]
) -> None:
    hdrs = {} if who == "no key" else bearer(getattr(keys, who))
    r = client.get("/ready", headers=hdrs)
    assert r.status_code == 200, r.text
    assert set(r.json()) == fields and r.json()["status"] == "ready"


def test_allowed_requests_pass(client: TestClient, keys: Keys) -> None:
    assert client.get("/health").status_code == 200
    assert client.get("/metrics").status_code == 200  # open by default (loopback)
    assert client.post(CHAT, json=BODY, headers=bearer(keys.user)).status_code == 200
    # RFC 9110: the scheme is case-insensitive.
    lower = {"Authorization": f"bearer {keys.user}"}
    assert client.post(CHAT, json=BODY, headers=lower).status_code == 200
    listed = client.get("/v1/models", headers=bearer(keys.user)).json()["data"]
    assert [m["id"] for m in listed] == ["fake-echo"]
    listed = client.get("/v1/models", headers=bearer(keys.auditor)).json()["data"]
    assert [m["id"] for m in listed] == ["fake-echo", "fake-other"]
    assert client.post(CHAT, json=BODY, headers=bearer(DEV_KEY)).status_code == 200


def test_revocation_takes_effect_on_the_next_request(
    client: TestClient, keys: Keys, tmp_path: Path
) -> None:
    assert client.post(CHAT, json=BODY, headers=bearer(keys.user)).status_code == 200
    KeyStore(tmp_path / "keys.db").revoke(keys.user_id)
    r = client.post(CHAT, json=BODY, headers=bearer(keys.user))
    assert error(r) == (401, "key_revoked")


def test_rate_limit_gives_429_then_recovers(client: TestClient, keys: Keys) -> None:
    now = [1000.0]
    client.app.state.security.limiter.clock = lambda: now[0]  # type: ignore[attr-defined]
    assert client.post(CHAT, json=BODY, headers=bearer(keys.limited)).status_code == 200
    r = client.post(CHAT, json=BODY, headers=bearer(keys.limited))
    assert error(r) == (429, "rate_limit_exceeded")
    assert r.json()["error"]["type"] == "requests"
    assert int(r.headers["retry-after"]) == 60
    assert client.post(CHAT, json=BODY, headers=bearer(keys.user)).status_code == 200
    now[0] += 60
    assert client.post(CHAT, json=BODY, headers=bearer(keys.limited)).status_code == 200


def test_token_limit_is_charged_after_the_answer() -> None:
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    key = Key("k", "k", "user", ("*",), tpm=100)
    limiter.admit(key)
    limiter.charge(key, 250)  # a long answer overdraws the bucket
    with pytest.raises(RateLimitError) as refused:
        limiter.admit(key)
    assert refused.value.retry_after == 91  # 151 tokens at 100/min
    now[0] += 91
    limiter.admit(key)


def test_admin_drains_and_generation_then_gets_503(client: TestClient, keys: Keys) -> None:
    r = client.post("/admin/drain", headers=bearer(keys.admin))
    assert r.status_code == 202
    r = client.post(CHAT, json=BODY, headers=bearer(keys.admin))
    assert error(r) == (503, "shutting_down")


def test_metrics_can_require_an_admin_or_auditor_key(keys: Keys, monkeypatch: Any) -> None:
    monkeypatch.setenv("MEDSERVE_AUTH__METRICS", "key")
    app = create_app(Settings(), Router.from_specs([fake_spec()]))
    with TestClient(app) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers=bearer(keys.user)).status_code == 403
        assert c.get("/metrics", headers=bearer(keys.auditor)).status_code == 200


def test_keys_and_failures_reach_the_audit_log_and_metrics(
    keys: Keys, client: TestClient, audit_path: Path
) -> None:
    # `keys` first: the keys exist before the server starts and copies the journal.
    client.post(CHAT, json=BODY, headers=bearer(keys.user))
    client.post(CHAT, json=BODY)
    client.post(CHAT, json=BODY, headers=bearer(keys.revoked))
    page = client.get("/metrics").text
    assert 'medserve_auth_failures_total{reason="missing"} 1.0' in page
    assert 'medserve_auth_failures_total{reason="revoked"} 1.0' in page
    client.__exit__(None, None, None)  # stop the server: the log is complete
    conn = sqlite3.connect(audit_path)
    records = [json.loads(b) for (b,) in conn.execute("SELECT body FROM records")]
    conn.close()
    events = [(r["event"], r["details"].get("name")) for r in records if r["kind"] == "event"]
    assert ("key.created", "triage-app") in events
    assert ("key.revoked", "old-app") in events
    requests = [r for r in records if r["kind"] == "request" and r["endpoint"] == CHAT]
    assert [(r["status"], r["key_id"]) for r in requests][:2] == [(200, keys.user_id), (401, None)]
    assert requests[2]["error"] == "key_revoked"


# Refusals and the key id their audit record carries: the key's own id wherever the key
# was identified (its secret matched), even though refused; none where it was not.
REFUSALS = [
    # name, Keys attribute (":wrong" for a wrong secret) or None, model, status, error,
    # whose id the record carries (a Keys attribute) or None
    ("revoked", "revoked", "fake-echo", 401, "key_revoked", "revoked"),
    ("expired", "expired", "fake-echo", 401, "key_expired", "expired"),
    ("model not permitted", "user", "fake-other", 403, "model_not_permitted", "user"),
    ("role not permitted", "auditor", "fake-echo", 403, "role_not_permitted", "auditor"),
    ("wrong secret: a claim only", "user:wrong", "fake-echo", 401, "invalid_api_key", None),
    ("no key", None, "fake-echo", 401, "missing_api_key", None),
]


@pytest.mark.parametrize(
    ("name", "who", "model", "status", "code", "recorded"), REFUSALS, ids=[r[0] for r in REFUSALS]
)
def test_a_refusal_records_the_key_it_identified(
    keys: Keys,
    client: TestClient,
    audit_path: Path,
    name: str,
    who: str | None,
    model: str,
    status: int,
    code: str,
    recorded: str | None,
) -> None:
    headers = headers_for(who, keys) if who is not None else {}
    r = client.post(CHAT, json={**BODY, "model": model}, headers=headers)
    assert error(r) == (status, code)
    client.__exit__(None, None, None)  # stop the server: the log is complete
    conn = sqlite3.connect(audit_path)
    records = [json.loads(b) for (b,) in conn.execute("SELECT body FROM records")]
    conn.close()
    [refused] = [r for r in records if r["kind"] == "request" and r["endpoint"] == CHAT]
    assert (refused["status"], refused["error"]) == (status, code)
    assert refused["key_id"] == (keys.ids[recorded] if recorded else None)
    secrets = [t.partition("_")[2] for t in (keys.user, keys.revoked, keys.expired)]
    assert not any(s in json.dumps(records) for s in secrets)


def test_cors_is_off_unless_origins_are_configured(keys: Keys, monkeypatch: Any) -> None:
    preflight = {
        "Origin": "https://portal.hospital.example",
        "Access-Control-Request-Method": "POST",
    }
    with TestClient(create_app(Settings(), Router.from_specs([fake_spec()]))) as c:
        r = c.options(CHAT, headers=preflight)
        assert "access-control-allow-origin" not in r.headers
    monkeypatch.setenv("MEDSERVE_CORS_ORIGINS", '["https://portal.hospital.example"]')
    with TestClient(create_app(Settings(), Router.from_specs([fake_spec()]))) as c:
        r = c.options(CHAT, headers=preflight)
        assert r.headers["access-control-allow-origin"] == "https://portal.hospital.example"


def audit_events(audit_path: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(f"{audit_path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        bodies = [json.loads(b) for (b,) in conn.execute("SELECT body FROM records")]
    finally:
        conn.close()
    return [r for r in bodies if r["kind"] == "event" and r["event"].startswith("key.")]


def wait_for(condition: Any, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_hand_edits_of_the_keys_file_reach_the_audit_log_once(
    keys: Keys, audit_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hand edit of the SQLite keys file (un-revoke!) is journaled by its trigger and
    copied like a `medserve keys` change; each entry once, even when the gateway's mark is
    set back (by hand, or lost) and when the server restarts."""
    import medserve.api.security as security

    monkeypatch.setattr(security, "JOURNAL_POLL_S", 0.05)
    db = tmp_path / "keys.db"
    revoked_id = keys.ids["revoked"]

    def journal_size() -> int:
        with closing(sqlite3.connect(db)) as conn:
            return int(conn.execute("SELECT count(*) FROM journal").fetchone()[0])

    def mark() -> int:
        with closing(sqlite3.connect(db)) as conn:
            row = conn.execute("SELECT max(last) FROM audited").fetchone()
        return int(row[0] or 0)

    def hand(statement: str, *args: Any) -> None:
        with closing(sqlite3.connect(db)) as conn, conn:
            conn.execute(statement, args)

    for restart in (False, True):
        app = create_app(Settings(), Router.from_specs([fake_spec()]))
        with TestClient(app) as client:
            if not restart:
                wait_for(lambda: mark() == journal_size(), "the keys' creations copied")
                hand("UPDATE keys SET revoked = NULL WHERE id = ?", revoked_id)
                hand("DELETE FROM keys WHERE name = 'pilot'")
                wait_for(lambda: mark() == journal_size(), "the hand edits copied")
                r = client.post(CHAT, json=BODY, headers=bearer(keys.revoked))
                assert r.status_code == 200  # un-revoked by hand: it works again...
            hand("UPDATE audited SET last = 0")  # ...and a mark set back copies nothing twice
            wait_for(lambda: mark() == journal_size(), "the mark restored")
    events = audit_events(audit_path)
    numbers = [e["details"]["journal"] for e in events]
    assert sorted(numbers) == list(range(1, journal_size() + 1))  # each entry exactly once
    by_action = {(e["event"], e["details"]["key_id"]) for e in events}
    assert ("key.unrevoked", revoked_id) in by_action
    assert ("key.deleted", keys.ids["expired"]) in by_action
    exported = CliRunner().invoke(cli_app, ["audit", "export", "--db", str(audit_path)])
    assert exported.exit_code == 0, exported.stderr
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    shown = {(r.get("event"), r.get("details", {}).get("key_id")) for r in lines}
    assert {("key.unrevoked", revoked_id), ("key.deleted", keys.ids["expired"])} <= shown
