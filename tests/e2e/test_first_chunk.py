"""The commit point: a client that leaves before its first chunk gives its permit back.

A generation request takes the router's admission permit and waits for the engine's first
chunk before any response byte is sent (medserve/api/serving.py). A client that closes its
connection during that wait, here queued behind the one busy slot, must not keep the permit
nor its place in the engine's queue: the queue empties at once (while the slot is still
busy), the request is audited as 499, and the permit it held goes to the next request.
Needs a real server: the disconnect is a closed socket.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import AUTH, DEV_KEY
from tests.serverproc import FAKE_MODEL, Server, fake_registry, running_server

pytestmark = pytest.mark.e2e

WAIT_S = 30.0  # bound on every poll: far above the milliseconds each step takes
# The holder keeps the one slot for 600 x 0.1 s = 60 s unless it leaves: longer than any
# poll below, so the victim is still queued when it closes its connection.
HOLD = {"model": FAKE_MODEL, "prompt": "w " * 600, "max_tokens": 600, "stream": True}
NEXT = {"model": FAKE_MODEL, "prompt": "one two three", "max_tokens": 3}


def ready(server: Server) -> dict[str, int]:
    """The fake model's line of /ready (running, waiting, rejected)."""
    models = httpx.get(f"{server.url}/ready", headers=AUTH, timeout=5).json()["models"]
    (model,) = models
    return {k: model[k] for k in ("running", "waiting", "rejected")}


def poll(what: str, condition: Callable[[], bool]) -> None:
    """Wait (bounded by WAIT_S) until ``condition()`` holds."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT_S} s: {what}")
        time.sleep(0.05)


def post_raw(server: Server, path: str, body: dict[str, object]) -> socket.socket:
    """Send one POST on a fresh connection and return the socket, unread."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {DEV_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


def records(db: Path) -> list[dict[str, object]]:
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT body FROM records WHERE kind = 'request' ORDER BY seq")
    found = [json.loads(body) for (body,) in rows.fetchall()]
    conn.close()
    return found


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "non-streaming"])
def test_leaving_before_the_first_chunk_frees_the_permit(tmp_path: Path, stream: bool) -> None:
    # One slot and one queue place: capacity 2. A permit kept by the victim would leave
    # none for NEXT while the holder runs (503), and the victim would stay queued.
    config = fake_registry(
        tmp_path / "fake.toml",
        context_length=2048,
        parallel=1,
        max_queue=1,
        fake_token_delay_s=0.1,
    )
    victim = {
        "model": FAKE_MODEL,
        "messages": [{"role": "user", "content": "a b c"}],
        "stream": stream,
    }
    with (
        running_server(tmp_path / "serve.log", "-c", str(config)) as server,
        ThreadPoolExecutor(max_workers=1) as pool,
    ):
        url = f"{server.url}/v1/completions"
        with httpx.stream("POST", url, json=HOLD, headers=AUTH, timeout=60) as holder:
            assert holder.status_code == 200  # its first chunk is out: it holds the slot
            sock = post_raw(server, "/v1/chat/completions", victim)
            poll("the victim queued behind the holder", lambda: ready(server)["waiting"] == 1)
            sock.close()  # before any byte of its response
            poll("the victim left the queue", lambda: ready(server)["waiting"] == 0)
            assert ready(server)["running"] == 1  # the holder still has the slot
            # Its permit is back: the next request is admitted (it queues, no 503).
            nxt = pool.submit(httpx.post, url, json=NEXT, headers=AUTH, timeout=120)
            poll("the next request queued", lambda: nxt.done() or ready(server)["waiting"] == 1)
            assert not nxt.done(), nxt.result().text
        # The holder left: the next request gets the slot and is served.
        reply = nxt.result(timeout=120)
        assert reply.status_code == 200
        assert reply.json()["choices"][0]["text"] == "one two three"
        poll("the model idle", lambda: ready(server) == {"running": 0, "waiting": 0, "rejected": 0})
    chat = [
        r
        for r in records(tmp_path / "audit" / "audit.db")
        if r["endpoint"] == "/v1/chat/completions"
    ]
    assert len(chat) == 1
    assert chat[0]["status"] == 499 and chat[0]["stream"] is stream
    assert chat[0]["completion_tokens"] in (None, 0)
