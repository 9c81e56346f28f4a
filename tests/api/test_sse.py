"""The SSE response (medserve.api.sse.EventStream) driven as an ASGI app: event bytes, a
comment when the stream is quiet, nothing after the last message, and a client that
leaves cancels the stream and releases what the response holds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import AsyncExitStack

import pytest
from starlette.types import Message

from medserve.api import sse
from medserve.api.sse import EventStream, event

pytestmark = pytest.mark.anyio
WAIT_S = 10.0  # bound on every wait for a condition


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize(
    ("payload", "sent"),
    [
        ('{"a":"é"}', 'data: {"a":"é"}\n\n'),
        ("[DONE]", "data: [DONE]\n\n"),
        ("one\ntwo", "data: one\ndata: two\n\n"),  # one data line per line
        ("one\r\ntwo\rthree", "data: one\ndata: two\ndata: three\n\n"),
        ("", "data: \n\n"),
    ],
)
def test_event_bytes(payload: str, sent: str) -> None:
    assert event(payload) == sent.encode()


def test_a_lone_surrogate_raises() -> None:
    with pytest.raises(UnicodeEncodeError):
        event('{"a":"\ud800"}')


class Held:
    """What the response holds: an exit stack whose closing is seen."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()
        self.stack = AsyncExitStack()
        self.stack.push_async_callback(self._close)

    async def _close(self) -> None:
        self.closed.set()


async def test_a_quiet_stream_gets_a_comment_and_nothing_follows_the_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sse, "PING_S", 0.05)
    pinged, held, messages = asyncio.Event(), Held(), []

    async def payloads() -> AsyncGenerator[str, None]:
        yield "first"
        await asyncio.wait_for(pinged.wait(), WAIT_S)  # quiet until a comment went out
        yield "second"

    async def send(message: Message) -> None:
        messages.append(message)
        if message.get("body") == sse.PING:
            pinged.set()

    async def receive() -> dict[str, object]:
        await asyncio.Event().wait()  # the client stays
        raise AssertionError

    response = EventStream(payloads(), held.stack, headers={"X-Medserve-Engine": "vllm:0"})
    await asyncio.wait_for(response({}, receive, send), WAIT_S)
    assert messages[0]["type"] == "http.response.start"
    assert (b"x-medserve-engine", b"vllm:0") in messages[0]["headers"]
    bodies = [m["body"] for m in messages[1:]]
    assert bodies[0] == b"data: first\n\n" and sse.PING in bodies
    assert bodies[-2:] == [b"data: second\n\n", b""]
    assert messages[-1]["more_body"] is False
    assert held.closed.is_set()


async def test_a_client_that_leaves_cancels_the_stream_and_releases_what_it_held() -> None:
    held, closed, left = Held(), asyncio.Event(), asyncio.Event()
    sent: list[Message] = []

    async def payloads() -> AsyncGenerator[str, None]:
        try:
            yield "first"
            await asyncio.Event().wait()  # an engine that has nothing more for now
        finally:
            closed.set()

    async def send(message: Message) -> None:
        sent.append(message)
        if message.get("body"):
            left.set()  # the client leaves once it has its first event

    async def receive() -> dict[str, object]:
        await left.wait()
        return {"type": "http.disconnect"}

    await asyncio.wait_for(EventStream(payloads(), held.stack)({}, receive, send), WAIT_S)
    assert closed.is_set() and held.closed.is_set()
    assert [m.get("more_body") for m in sent[1:]] == [True]  # no last message to nobody
