"""Work before admission is bounded: what cannot fit is refused before it is rendered.

On the fake engine, counting renders: a refused request must not have been rendered. The
character bound needs a vocabulary bound (``EngineInfo.max_token_bytes``), which the fake
engine (a word is a token) does not have; a subclass declares one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from medserve.api.app import create_app
from medserve.auth.keys import KeyStore
from medserve.config import Settings
from medserve.engines.base import Message, Prompt
from medserve.engines.fake import FakeEngine
from medserve.router import Router, Served
from tests.conftest import AUTH, fake_spec

CHAT = "/v1/chat/completions"
MODEL = "fake-echo"
CONTEXT = 2048
TOKEN_BYTES = 4


class CountingEngine(FakeEngine):
    """The fake engine, counting renders, with a declared bytes-per-token bound and an
    optional rendering time (simulated work, not synchronisation)."""

    def __init__(self, render_s: float = 0.0, **spec: Any) -> None:
        super().__init__(fake_spec(context_length=CONTEXT, **spec))
        self._info = dataclasses.replace(self._info, max_token_bytes=TOKEN_BYTES)
        self.renders = 0
        self.render_s = render_s

    async def render_chat(self, messages: tuple[Message, ...]) -> Prompt:
        self.renders += 1
        await asyncio.sleep(self.render_s)
        return await super().render_chat(messages)

    async def render_text(self, text: str) -> Prompt:
        self.renders += 1
        await asyncio.sleep(self.render_s)
        return await super().render_text(text)


def client_for(engine: CountingEngine) -> Iterator[TestClient]:
    app = create_app(Settings(), Router([Served(engine._spec, (engine,))]))
    with TestClient(app, raise_server_exceptions=False, headers=AUTH) as c:
        yield c


@pytest.fixture
def engine() -> CountingEngine:
    return CountingEngine()


@pytest.fixture
def client(engine: CountingEngine) -> Iterator[TestClient]:
    yield from client_for(engine)


def test_sixty_thousand_messages_are_refused_unrendered(
    client: TestClient, engine: CountingEngine
) -> None:
    body = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": ""}] * 60_000}
    ).encode()
    assert len(body) > 1_500_000  # the 1.7 MB body, under the body limit
    start = time.monotonic()
    r = client.post(CHAT, content=body, headers={"Content-Type": "application/json"})
    elapsed = time.monotonic() - start
    assert r.status_code == 400
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", "messages")
    assert engine.renders == 0
    assert elapsed < 2.0, f"refusing took {elapsed:.1f} s"


# (messages, characters per message, max_messages, expected status)
BOUNDS = [
    pytest.param(3, 1, 3, 200, id="at max_messages"),
    pytest.param(4, 1, 3, 400, id="over max_messages"),
    pytest.param(CONTEXT, 0, 10_000, 400, id="context_length messages (plus template) too many"),
    pytest.param(CONTEXT + 1, 0, 10_000, 400, id="over context_length messages"),
    pytest.param(1, CONTEXT * TOKEN_BYTES, 10, 200, id="characters: at the bound, rendered"),
    pytest.param(1, CONTEXT * TOKEN_BYTES + 1, 10, 400, id="characters over the bound"),
    pytest.param(2, CONTEXT * TOKEN_BYTES // 2 + 1, 10, 400, id="characters summed over messages"),
]


@pytest.mark.parametrize(("count", "chars", "max_messages", "status"), BOUNDS)
def test_chat_bounds(count: int, chars: int, max_messages: int, status: int) -> None:
    engine = CountingEngine(max_messages=max_messages)
    for client in client_for(engine):
        messages = [{"role": "user", "content": "x" * chars} for _ in range(count)]
        r = client.post(CHAT, json={"model": MODEL, "messages": messages, "max_tokens": 1})
        assert r.status_code == status, r.text
        if status == 400:
            assert r.json()["error"]["param"] == "messages"
            assert r.json()["error"]["code"] == "context_length_exceeded"
            assert "x" * 5 not in r.text  # the text is never echoed
            over_bound = count > min(max_messages, CONTEXT) or count * chars > (
                CONTEXT * TOKEN_BYTES
            )
            assert engine.renders == (0 if over_bound else 1)


@pytest.mark.parametrize(
    ("chars", "rendered"),
    [(CONTEXT * TOKEN_BYTES + 1, 0), (CONTEXT * TOKEN_BYTES, 1)],
    ids=["over the bound: unrendered", "at the bound: rendered, then too long"],
)
def test_completion_prompt_bound(chars: int, rendered: int) -> None:
    engine = CountingEngine()
    for client in client_for(engine):
        prompt = "x " * (chars // 2) + "x" * (chars % 2)  # a word is a token here
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt})
        assert r.status_code == 400
        error = r.json()["error"]
        assert (error["code"], error["param"]) == ("context_length_exceeded", "prompt")
        assert engine.renders == rendered


def test_rendering_counts_against_timeout() -> None:
    """The deadline starts at arrival: a rendering that outlasts timeout_s is a 504."""
    engine = CountingEngine(render_s=0.5, timeout_s=0.1)
    for client in client_for(engine):
        r = client.post(CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": "a"}]})
        assert r.status_code == 504
        assert engine.requests == []  # never reached generation


def test_deadline_is_set_from_arrival() -> None:
    engine = CountingEngine(render_s=0.3, timeout_s=60)
    for client in client_for(engine):
        sent = time.monotonic()
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": "a b"})
        assert r.status_code == 200
        deadline = engine.requests[0].deadline
        assert deadline is not None
        # Started before the 0.3 s rendering, not after it.
        assert sent <= deadline - 60 < sent + 0.3


def test_rendered_prompt_refused_as_too_long_is_charged(tmp_path: Path) -> None:
    """Rendering was work: its tokens count against the key's tokens per minute."""
    _, secret = KeyStore(tmp_path / "keys.db").create("notebook", "user", tpm=100)
    engine = CountingEngine()
    for client in client_for(engine):
        headers = {"Authorization": f"Bearer {secret}"}
        too_long = {"model": MODEL, "prompt": "x " * 3000}  # 3000 tokens > 2048, rendered
        r = client.post("/v1/completions", json=too_long, headers=headers)
        assert r.json()["error"]["code"] == "context_length_exceeded"
        assert engine.renders == 1
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": "a"}, headers=headers)
        assert r.status_code == 429
        assert "tokens per minute" in r.json()["error"]["message"]
