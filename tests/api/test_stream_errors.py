"""A stream that fails ends with its error event and no `[DONE]`, whatever the failure.

`[DONE]` promises a complete answer whose audit record is committed; after an error
event it would be a lie. Table over every way a stream fails after its headers are out:
an engine error, a timeout, an unexpected exception, and an audit write that fails, on
both endpoints, on the fake engine (scripted) and the real audit store.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from medserve.api.app import create_app
from medserve.config import AuditSettings, Settings
from medserve.engines.base import GenerationChunk, GenerationRequest
from medserve.engines.fake import FakeEngine
from medserve.errors import RequestTimeoutError
from medserve.router import Router, Served
from tests.conftest import AUTH, DEV_KEY, SECRET, fake_spec
from tests.sse import payloads

PROMPT = "one two three four five"
BODIES = {
    "/v1/chat/completions": {
        "model": "fake-echo",
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": True,
    },
    "/v1/completions": {"model": "fake-echo", "prompt": PROMPT, "stream": True},
}


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(fake_spec())


@pytest.fixture
def client(engine: FakeEngine, audit_path: Path) -> Iterator[TestClient]:
    settings = Settings(audit=AuditSettings(path=audit_path, busy_timeout_ms=0))
    app = create_app(settings, Router([Served(fake_spec(), (engine,))]))
    with TestClient(app, raise_server_exceptions=False, headers=AUTH) as c:
        yield c


Generate = Callable[[GenerationRequest], AsyncGenerator[GenerationChunk, None]]


def scripted(error: Exception) -> Generate:
    async def generate(request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        yield GenerationChunk("partial")
        raise error

    return generate


def engine_error(engine: FakeEngine, db: Path) -> AbstractContextManager[object]:
    engine.fail_after = 2
    return nullcontext()


def timeout(engine: FakeEngine, db: Path) -> AbstractContextManager[object]:
    engine.generate = scripted(RequestTimeoutError())  # type: ignore[method-assign,assignment]
    return nullcontext()


def crash(engine: FakeEngine, db: Path) -> AbstractContextManager[object]:
    # e.g. a library bug whose message quotes its input
    engine.generate = scripted(RuntimeError(SECRET))  # type: ignore[method-assign,assignment]
    return nullcontext()


@contextmanager
def audit_write_fails(engine: FakeEngine, db: Path) -> Iterator[object]:
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # the generation's record cannot commit
    try:
        yield None
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


Fault = Callable[[FakeEngine, Path], AbstractContextManager[object]]
CASES = [
    pytest.param(engine_error, "engine_error", id="engine-error"),
    pytest.param(timeout, "timeout", id="timeout"),
    pytest.param(crash, None, id="unexpected-exception"),
    pytest.param(audit_write_fails, "audit_unavailable", id="audit-write"),
]


def events(r: Any) -> list[str]:
    return payloads(r.iter_lines())


@pytest.mark.parametrize("path", list(BODIES))
@pytest.mark.parametrize(("fault", "code"), CASES)
def test_a_failed_stream_ends_with_its_error_and_no_done(
    client: TestClient, engine: FakeEngine, audit_path: Path, path: str, fault: Fault, code: Any
) -> None:
    with fault(engine, audit_path), client.stream("POST", path, json=BODIES[path]) as r:
        assert r.status_code == 200  # headers were out before the failure
        got = events(r)
    assert "[DONE]" not in got
    error = json.loads(got[-1])["error"]
    assert (error["type"], error["code"]) == ("server_error", code)
    assert SECRET not in "".join(got)
    assert len(got) > 1  # the failure came after some of the answer


def test_a_stream_without_a_failure_still_ends_with_done(client: TestClient) -> None:
    with client.stream("POST", "/v1/completions", json=BODIES["/v1/completions"]) as r:
        got = events(r)
    assert got[-1] == "[DONE]"
    assert all("error" not in json.loads(e) for e in got[:-1])


@pytest.mark.parametrize(("fault", "code"), CASES)
def test_the_openai_client_raises_on_a_failed_stream(
    client: TestClient, engine: FakeEngine, audit_path: Path, fault: Fault, code: Any
) -> None:
    api = openai.OpenAI(base_url="http://testserver/v1", api_key=DEV_KEY, http_client=client)
    received: list[str] = []
    with fault(engine, audit_path), pytest.raises(openai.APIError) as caught:
        stream = api.chat.completions.create(
            model="fake-echo", messages=[{"role": "user", "content": PROMPT}], stream=True
        )
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
    assert caught.value.code == code
    assert isinstance(caught.value.body, dict) and caught.value.body["type"] == "server_error"
    assert "".join(received)  # what came before the error reached the caller
