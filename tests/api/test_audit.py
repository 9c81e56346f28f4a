"""Every request leaves a record, with keyed hashes instead of text; failures fail closed.

Runs the real audit store (SQLite file, real keys) behind the app on the fake engine.
"""

from __future__ import annotations

import json
import logging
import socket
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from medserve.api.app import create_app
from medserve.audit.keys import ChainKeys, ContentCipher, load_or_create_secret
from medserve.audit.verify import verify
from medserve.cli import app
from medserve.config import AuditSettings, Settings
from medserve.router import Router
from tests.conftest import AUTH, SECRET, fake_spec
from tests.sse import DONE, payloads

CHAT = "/v1/chat/completions"
MODEL = "fake-echo"


@contextmanager
def serving(audit_path: Path, **audit: Any) -> Iterator[TestClient]:
    conf = AuditSettings(path=audit_path, **audit)
    router = Router.from_specs([fake_spec()])
    app = create_app(Settings(max_body_bytes=4096, audit=conf), router)
    with TestClient(app, raise_server_exceptions=False, headers=AUTH) as client:
        yield client


def records(db: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT body FROM records ORDER BY seq").fetchall()
    conn.close()
    return [json.loads(body) for (body,) in rows]


def requests(db: Path) -> list[dict[str, Any]]:
    return [r for r in records(db) if r["kind"] == "request"]


def keys(audit_path: Path) -> ChainKeys:
    return ChainKeys.from_secret(load_or_create_secret(audit_path.with_name("audit.key")))


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


def test_a_chat_request_is_recorded_before_its_response_completes(audit_path: Path) -> None:
    with serving(audit_path) as client:
        r = client.post(CHAT, json=chat("chest pain", user="ward-7"))
        assert r.status_code == 200
        # Read while the server still runs: the record is already durable.
        (rec,) = requests(audit_path)
    body = r.json()
    assert rec["request_id"] == r.headers["x-request-id"]
    assert rec["endpoint"] == CHAT and rec["method"] == "POST" and rec["status"] == 200
    assert (rec["model"], rec["engine"], rec["replica"]) == (MODEL, "fake", "fake:0")
    assert rec["instance"] == socket.gethostname()  # Settings.instance's default
    # `user` is free text (it may name a patient): kept as its keyed hash. The test
    # client's address ("testclient") is not an IP address.
    assert rec["user_hmac"] == keys(audit_path).text_hmac(b"ward-7") and "user" not in rec
    assert rec["client"] == "invalid"
    assert rec["prompt_tokens"] == body["usage"]["prompt_tokens"]
    assert rec["completion_tokens"] == body["usage"]["completion_tokens"]
    assert rec["finish_reason"] == "stop" and rec["stream"] is False
    k = keys(audit_path)
    assert rec["prompt_hmac"] == k.text_hmac(b'[{"role":"user","content":"chest pain"}]')
    assert rec["completion_hmac"] == k.text_hmac(body["choices"][0]["message"]["content"].encode())
    assert rec["latency_ms"] >= 0


def test_a_stream_is_recorded_before_done(audit_path: Path) -> None:
    with serving(audit_path) as client:
        body = {"model": MODEL, "prompt": "one two three", "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as r:
            assert payloads(r.iter_lines())[-1] == DONE
            (rec,) = requests(audit_path)  # before the client has closed the response
    assert rec["endpoint"] == "/v1/completions" and rec["stream"] is True
    assert rec["finish_reason"] == "stop" and rec["completion_tokens"] == 3
    assert rec["completion_hmac"] == keys(audit_path).text_hmac(b"one two three")


@pytest.mark.parametrize(
    ("method", "path", "payload", "status", "error", "endpoint"),
    [
        ("POST", CHAT, {**chat("x"), "model": "nope"}, 404, "model_not_found", CHAT),
        ("POST", CHAT, {"model": MODEL}, 400, "invalid_request_error", CHAT),
        ("POST", CHAT, chat("x", n=2), 400, "unsupported_parameter", CHAT),
        ("GET", "/v1/secret-admin", None, 404, "not_found", "unmatched"),
        ("DELETE", "/v1/models", None, 405, "method_not_allowed", "/v1/models"),
        ("POST", CHAT, chat("x" * 5000), 413, "request_too_large", CHAT),
        ("GET", "/v1/models", None, 200, None, "/v1/models"),
    ],
)
def test_refused_and_other_requests_are_recorded(
    audit_path: Path,
    method: str,
    path: str,
    payload: Any,
    status: int,
    error: str | None,
    endpoint: str,
) -> None:
    with serving(audit_path) as client:
        r = client.request(method, path, json=payload)
        assert r.status_code == status
    (rec,) = requests(audit_path)
    assert (rec["status"], rec["error"], rec["endpoint"]) == (status, error, endpoint)
    assert rec["request_id"] == r.headers["x-request-id"]


def test_probes_are_not_recorded_and_lifecycle_events_are(audit_path: Path) -> None:
    with serving(audit_path) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 200
    events = [(r["kind"], r.get("event")) for r in records(audit_path)]
    assert events == [
        ("event", "config.loaded"),
        ("event", "server.start"),
        ("event", "server.stop"),
    ]
    loaded = records(audit_path)[0]["details"]
    assert loaded["models"] == [{"id": MODEL, "engine": "fake"}]


def test_no_patient_text_in_the_log_the_logs_or_error_bodies(
    audit_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="medserve")
    bodies = []
    with serving(audit_path) as client:
        for payload in (
            chat(SECRET),
            {"model": MODEL, "prompt": SECRET, "stream": True},
            {"model": SECRET, "messages": [{"role": "user", "content": SECRET}]},
            {"model": MODEL, "messages": [{"role": SECRET, "content": SECRET}]},
            {"model": MODEL, "prompt": SECRET, "max_tokens": SECRET},
        ):
            path = "/v1/completions" if "prompt" in payload else CHAT
            bodies.append(client.post(path, json=payload).text)
        client.get(f"/v1/models/{SECRET}")
    assert len(requests(audit_path)) == 6
    assert SECRET in bodies[0]  # the echo engine returned it: the check below can fail
    for body in bodies[2:]:
        assert SECRET not in body
    stored = b"".join(p.read_bytes() for p in audit_path.parent.iterdir() if p.is_file())
    assert SECRET.encode() not in stored
    assert SECRET not in caplog.text


def test_fail_closed_withholds_the_answer_and_refuses_until_the_log_recovers(
    audit_path: Path,
) -> None:
    with serving(audit_path, busy_timeout_ms=0, retry_after_s=7) as client:
        engine = client.app.state.router.get(MODEL).engine  # type: ignore[attr-defined]
        blocker = sqlite3.connect(audit_path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        r = client.post(CHAT, json=chat(SECRET))
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "audit_unavailable"
        assert r.headers["retry-after"] == "7"
        assert SECRET not in r.text
        generated = len(engine.requests)
        ready = client.get("/ready")
        assert ready.status_code == 503 and ready.json()["audit"]["writable"] is False
        # While the log is failing: refused up front, nothing generated.
        r = client.post(CHAT, json=chat("x"))
        assert r.status_code == 503 and r.json()["error"]["code"] == "audit_unavailable"
        assert len(engine.requests) == generated
        assert client.get("/health").status_code == 200
        blocker.execute("ROLLBACK")
        blocker.close()
        # The next refusal's record commits and re-opens the server.
        assert client.get("/v1/models").status_code == 503
        assert client.post(CHAT, json=chat("y")).status_code == 200
        assert client.app.state.auditor.lost == 2  # type: ignore[attr-defined]
        assert client.get("/ready").status_code == 200
    assert verify(audit_path, keys(audit_path), None).ok
    assert [r["status"] for r in requests(audit_path)] == [503, 200]


def test_a_stream_whose_record_fails_ends_with_an_error_event_not_done(audit_path: Path) -> None:
    with serving(audit_path, busy_timeout_ms=0) as client:
        blocker = sqlite3.connect(audit_path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        body = {"model": MODEL, "prompt": "one two", "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as r:
            events = payloads(r.iter_lines())
        blocker.execute("ROLLBACK")
        blocker.close()
    assert "[DONE]" not in events  # [DONE] promises a committed record
    assert json.loads(events[-1])["error"]["code"] == "audit_unavailable"


def test_fail_open_answers_and_counts_the_lost_record(
    audit_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with serving(audit_path, busy_timeout_ms=0, on_failure="open") as client:
        blocker = sqlite3.connect(audit_path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        r = client.post(CHAT, json=chat("a"))
        blocker.execute("ROLLBACK")
        blocker.close()
        assert r.status_code == 200
        assert client.app.state.auditor.lost == 1  # type: ignore[attr-defined]
    assert "audit record lost" in caplog.text


def test_content_capture_is_encrypted_and_decrypts_with_its_key(
    audit_path: Path, tmp_path: Path
) -> None:
    key_file = tmp_path / "content.key"
    with serving(audit_path, capture=True, capture_key_file=key_file) as client:
        assert client.post(CHAT, json=chat(SECRET)).status_code == 200
    stored = b"".join(p.read_bytes() for p in audit_path.parent.iterdir() if p.is_file())
    assert SECRET.encode() not in stored
    conn = sqlite3.connect(audit_path)
    seq, sealed = conn.execute("SELECT seq, sealed FROM content").fetchone()
    body = json.loads(conn.execute("SELECT body FROM records WHERE seq = ?", (seq,)).fetchone()[0])
    conn.close()
    cipher = ContentCipher(load_or_create_secret(key_file))
    content = json.loads(cipher.open(sealed, body["request_id"]))
    assert SECRET in content["prompt"] and SECRET in content["completion"]
    assert body["content_sha256"] is not None
    # The auditor's export decrypts it only with the key.
    plain = CliRunner().invoke(app, ["audit", "export", "--db", str(audit_path)]).stdout
    assert SECRET not in plain
    args = ["audit", "export", "--db", str(audit_path), "--content-key", str(key_file)]
    lines = CliRunner().invoke(app, args).stdout.splitlines()
    (exported,) = [json.loads(x) for x in lines if '"content"' in x]
    assert SECRET in exported["content"]["prompt"]


def test_an_auditor_can_find_a_text_by_its_keyed_hash(audit_path: Path, tmp_path: Path) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": SECRET}]
    with serving(audit_path) as client:
        assert client.post(CHAT, json={"model": MODEL, "messages": messages}).status_code == 200
        client.post("/v1/completions", json={"model": MODEL, "prompt": SECRET})
    (file := tmp_path / "suspect.json").write_text(json.dumps(messages))
    (text := tmp_path / "suspect.txt").write_text(SECRET)
    key = ["--key", str(audit_path.with_name("audit.key"))]
    chat_hash = CliRunner().invoke(app, ["audit", "hash", "--chat", str(file), *key]).stdout
    text_hash = CliRunner().invoke(app, ["audit", "hash", str(text), *key]).stdout
    recorded = [r["prompt_hmac"] for r in requests(audit_path)]
    assert recorded == [chat_hash.strip(), text_hash.strip()]


def test_an_auditor_finds_a_chat_with_tool_calls_by_its_keyed_hash(
    audit_path: Path, tmp_path: Path
) -> None:
    """The messages as the client sent them (OpenAI's form: developer role, text parts,
    an assistant's tool_calls with null content, a tool message) hash as the server did."""
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": SECRET},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": SECRET},
    ]
    tools = [{"type": "function", "function": {"name": "f"}}]
    with serving(audit_path) as client:
        body = {"model": MODEL, "messages": messages, "tools": tools, "tool_choice": "none"}
        assert client.post(CHAT, json=body).status_code == 200
    (file := tmp_path / "suspect.json").write_text(json.dumps(messages))
    key = ["--key", str(audit_path.with_name("audit.key"))]
    chat_hash = CliRunner().invoke(app, ["audit", "hash", "--chat", str(file), *key]).stdout
    (record,) = requests(audit_path)
    assert record["prompt_hmac"] == chat_hash.strip()
