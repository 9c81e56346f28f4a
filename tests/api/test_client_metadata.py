"""What the client controls reaches the audit record and the access log only bounded or hashed.

Each client-controlled input (method, path, query, headers, forwarded address, body
fields) carries a marker, as is, 5,000 characters long, or with control characters. The
whole audit store (read as SQLite bytes) and every access-log line (as the JSON formatter
writes it) must hold none of it, and each record field must be one of its bounded values.
The app runs behind the same uvicorn configuration as `medserve serve` (proxy headers off
unless a proxy is trusted).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import uvicorn
from fastapi.testclient import TestClient

from medserve.api.app import create_app
from medserve.api.exchange import METHODS
from medserve.audit.keys import ChainKeys, load_or_create_secret
from medserve.cli import server_options
from medserve.config import Settings
from medserve.logs import JsonFormatter
from medserve.router import Router
from tests.conftest import AUTH, SECRET, fake_spec

CHAT = "/v1/chat/completions"
MODEL = "fake-echo"
LONG = (SECRET * (5000 // len(SECRET) + 1))[:5000]
CONTROL = f"{SECRET}\x1b[2J\x07\x08\x7f"
VALUES = {"plain": SECRET, "5000 chars": LONG, "control chars": CONTROL}
TEMPLATES = {CHAT, "/v1/completions", "/v1/models", "/v1/models/{model_id:path}", "unmatched"}


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], **extra}


def header(value: str) -> bytes:
    # Header values on the wire are bytes; CR/LF cannot be in one (the server's parser
    # refuses them), so control characters here are the others.
    return value.encode()


# name -> what the client sends with ``value`` in it (keyword arguments of client.request).
INPUTS: dict[str, Callable[[str], dict[str, Any]]] = {
    "method": lambda v: {"method": v[:4000], "url": "/v1/models"},
    "path": lambda v: {"method": "GET", "url": "/v1/models/" + quote(v, safe="")},
    "unmatched path": lambda v: {"method": "GET", "url": "/v1/" + quote(v, safe="")},
    "query string": lambda v: {"method": "GET", "url": "/v1/models", "params": {"q": v}},
    "x-forwarded-for": lambda v: {
        "method": "GET",
        "url": "/v1/models",
        "headers": {"X-Forwarded-For": header(v)},
    },
    "x-request-id": lambda v: {
        "method": "GET",
        "url": "/v1/models",
        "headers": {"X-Request-Id": header(v)},
    },
    "user-agent": lambda v: {
        "method": "POST",
        "url": CHAT,
        "json": chat(),
        "headers": {"User-Agent": header(v)},
    },
    "authorization": lambda v: {
        "method": "GET",
        "url": "/v1/models",
        "headers": {"Authorization": b"Bearer " + header(v)},
    },
    "content-type": lambda v: {
        "method": "POST",
        "url": CHAT,
        "content": json.dumps(chat()),
        "headers": {"Content-Type": header(v)},
    },
    "model": lambda v: {"method": "POST", "url": CHAT, "json": {**chat(), "model": v}},
    "user": lambda v: {"method": "POST", "url": CHAT, "json": chat(user=v)},
    "message": lambda v: {
        "method": "POST",
        "url": CHAT,
        "json": chat(messages=[{"role": "user", "content": v}]),
    },
    "message name": lambda v: {
        "method": "POST",
        "url": CHAT,
        "json": chat(messages=[{"role": "user", "content": "x", "name": v}]),
    },
    "stop": lambda v: {"method": "POST", "url": CHAT, "json": chat(stop=[v])},
    "prompt": lambda v: {
        "method": "POST",
        "url": "/v1/completions",
        "json": {"model": MODEL, "prompt": v, "max_tokens": 4},
    },
    "unknown field": lambda v: {"method": "POST", "url": CHAT, "json": {**chat(), v: v}},
    "json key": lambda v: {"method": "POST", "url": CHAT, "json": chat(logit_bias={v: 1})},
}


@contextmanager
def serving(audit_path: Path, **settings: Any) -> Iterator[TestClient]:
    conf = Settings(max_body_bytes=1_000_000, **settings)
    app = create_app(conf, Router.from_specs([fake_spec(context_length=4096)]))
    config = uvicorn.Config(app, **server_options(conf))
    config.load()  # wraps the app as `medserve serve` does (proxy headers or not)
    with TestClient(
        config.loaded_app, raise_server_exceptions=False, headers=AUTH, client=("127.0.0.1", 5)
    ) as client:
        yield client


def store_bytes(db: Path) -> bytes:
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT body FROM records ORDER BY seq").fetchall()
    conn.close()
    return b"\n".join(bytes(body) for (body,) in rows)


def request_records(db: Path) -> list[dict[str, Any]]:
    return [r for r in map(json.loads, store_bytes(db).split(b"\n")) if r["kind"] == "request"]


def traces(value: str) -> list[str]:
    """Pieces of ``value`` that must not appear: the marker, and the control characters."""
    found = [SECRET, SECRET.lower()]
    found += [c for c in value if not c.isprintable()]
    return found


def assert_bounded(rec: dict[str, Any]) -> None:
    assert rec["method"] in METHODS | {"OTHER"}
    if rec["client"] not in (None, "invalid"):
        ipaddress.ip_address(rec["client"])
    assert rec["endpoint"] in TEMPLATES
    assert rec["model"] in (None, MODEL)
    assert rec["engine"] in (None, "fake")
    assert re.fullmatch(r"[0-9a-f]{32}", rec["request_id"])
    assert rec["error"] is None or re.fullmatch(r"[a-z_]{1,40}", rec["error"])
    for name in ("user_hmac", "prompt_hmac", "completion_hmac"):
        assert rec[name] is None or re.fullmatch(r"[0-9a-f]{64}", rec[name])
    assert "user" not in rec


@pytest.mark.parametrize("kind", list(VALUES))
@pytest.mark.parametrize("field", list(INPUTS))
def test_client_input_reaches_neither_the_audit_record_nor_the_access_log(
    audit_path: Path, caplog: pytest.LogCaptureFixture, field: str, kind: str
) -> None:
    value = VALUES[kind]
    caplog.set_level(logging.INFO, logger="medserve")
    with serving(audit_path) as client:
        r = client.request(**INPUTS[field](value))
    assert r.status_code < 500, r.text
    stored = store_bytes(audit_path).decode()
    lines = [JsonFormatter().format(rec) for rec in caplog.records]
    access = [json.loads(line) for line in lines if '"logger": "medserve.access"' in line]
    assert access, lines
    for trace in traces(value):
        assert trace not in stored, (field, trace)
        for line in lines:
            assert trace not in json.loads(line).get("msg", "") + line, (field, trace)
    for rec in request_records(audit_path):
        assert_bounded(rec)
    for line in access:
        assert line["method"] in METHODS | {"OTHER"}
        assert line["route"] in TEMPLATES
        assert "user" not in line and "client" not in line


def test_an_unknown_or_long_method_is_recorded_as_other(audit_path: Path) -> None:
    with serving(audit_path) as client:
        for method in ("X" * 5007, "PROPFIND", "M-SEARCH", "GET"):
            client.request(method, "/v1/models")
    methods = [r["method"] for r in request_records(audit_path)]
    assert methods == ["OTHER", "OTHER", "OTHER", "GET"]


def test_the_user_is_recorded_as_its_keyed_hash(audit_path: Path) -> None:
    with serving(audit_path) as client:
        assert client.post(CHAT, json=chat(user=SECRET)).status_code == 200
        assert client.post(CHAT, json=chat()).status_code == 200
    first, second = request_records(audit_path)
    keys = ChainKeys.from_secret(load_or_create_secret(audit_path.with_name("audit.key")))
    assert first["user_hmac"] == keys.text_hmac(SECRET.encode())
    assert second["user_hmac"] is None


@pytest.mark.parametrize(
    ("forwarded", "trusted", "client"),
    [
        ("10.1.2.3", [], "127.0.0.1"),  # proxy headers off: the connecting address
        (SECRET, [], "127.0.0.1"),
        ("10.1.2.3", ["127.0.0.1"], "10.1.2.3"),
        ("10.1.2.3, 127.0.0.1", ["127.0.0.0/8"], "10.1.2.3"),
        ("fe80::1", ["127.0.0.1"], "fe80::1"),
        (SECRET, ["127.0.0.1"], "invalid"),  # a trusted proxy, but not an address
        ("10.1.2.3", ["192.0.2.1"], "127.0.0.1"),  # the connecting address is no proxy
    ],
)
def test_the_client_address_is_the_peer_unless_a_trusted_proxy_says_otherwise(
    audit_path: Path, forwarded: str, trusted: list[str], client: str
) -> None:
    with serving(audit_path, trusted_proxies=trusted) as c:
        assert c.get("/v1/models", headers={"X-Forwarded-For": forwarded}).status_code == 200
    (rec,) = request_records(audit_path)
    assert rec["client"] == client
