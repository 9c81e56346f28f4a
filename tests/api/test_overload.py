"""A full queue is refused before the first response byte, streaming or not.

The admission permit is taken before any response starts: a streaming request that finds
every slot and the queue busy gets the same 503 + ``Retry-After`` as a non-streaming one,
never a 200 whose stream then says ``overloaded``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from medserve.api.app import create_app
from medserve.config import Settings
from medserve.router import Router
from tests.conftest import AUTH, fake_spec
from tests.sse import iter_payloads

MODEL = "fake-echo"
CHAT = "/v1/chat/completions"
BODIES: dict[str, dict[str, Any]] = {
    CHAT: {"model": MODEL, "messages": [{"role": "user", "content": "a b"}]},
    "/v1/completions": {"model": MODEL, "prompt": "a b"},
}


HOLD = {"model": MODEL, "prompt": "w " * 200, "stream": True, "max_tokens": 300}


def hold(client: TestClient, started: threading.Event, done: threading.Event) -> None:
    """Stream a long answer until ``done`` is set (then disconnect)."""
    with client.stream("POST", "/v1/completions", json=HOLD) as r:
        assert r.status_code == 200
        for _ in r.iter_lines():
            started.set()
            if done.is_set():
                break


@pytest.fixture
def busy() -> Iterator[TestClient]:
    """A server whose one slot is held by a long stream (no queue)."""
    spec = fake_spec(parallel=1, max_queue=0, fake_token_delay_s=0.01, context_length=512)
    app = create_app(Settings(), Router.from_specs([spec]))
    with TestClient(app, raise_server_exceptions=False, headers=AUTH) as client:
        started, done = threading.Event(), threading.Event()
        holder = threading.Thread(target=hold, args=(client, started, done))
        holder.start()
        assert started.wait(timeout=30)
        try:
            yield client
        finally:
            done.set()
            holder.join(timeout=60)
            assert not holder.is_alive()


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("path", list(BODIES))
def test_a_full_queue_is_503_before_any_byte(busy: TestClient, path: str, stream: bool) -> None:
    r = busy.post(path, json={**BODIES[path], "stream": stream})
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"]
    assert r.json()["error"]["code"] == "overloaded"


def outstanding(client: TestClient) -> tuple[int, int]:
    """Requests the router counts on the model's engine, and those the engine runs, once
    both settle (bounded wait: the permit is returned as the response finishes)."""
    router: Router = client.app.state.router  # type: ignore[attr-defined]
    (served,) = router
    engine = served.engine
    for _ in range(500):
        count = router.load(engine).outstanding
        running = engine._running  # type: ignore[attr-defined]
        if count == 0 and running == 0:
            break
        threading.Event().wait(0.01)
    return count, running


@pytest.mark.parametrize("leave_early", [False, True], ids=["finished", "client-gone"])
def test_the_permit_is_returned_when_the_stream_ends(leave_early: bool) -> None:
    spec = fake_spec(parallel=1, max_queue=0, fake_token_delay_s=0.01, context_length=512)
    app = create_app(Settings(), Router.from_specs([spec]))
    with TestClient(app, raise_server_exceptions=False, headers=AUTH) as client:
        body = {**HOLD, "max_tokens": 300 if leave_early else 5}
        with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            for _ in iter_payloads(r.iter_lines()):
                if leave_early:
                    break
        assert outstanding(client) == (0, 0)
        # And the one slot takes the next request.
        assert client.post("/v1/completions", json=BODIES["/v1/completions"]).status_code == 200
