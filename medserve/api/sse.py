"""Server-sent events out: the streaming response of a generation, as one ASGI response.

Each payload the stream yields goes out as one event, ``data: PAYLOAD\\n\\n`` (a payload
with line breaks as one ``data:`` line per line, as the SSE specification joins them), in
one ASGI message, written as it comes: no buffering, no per-event task, lock or timer.
When nothing was sent for PING_S seconds, a comment line (``: ping``) keeps proxies from
closing a quiet connection (a long pause between tokens). A client that disconnects
cancels the stream at once. Shutdown is uvicorn's: an open stream runs on through the
drain period, and uvicorn cancels what is left when its graceful shutdown times out.

Whatever ends the response (the stream's end, the client leaving, an error, shutdown),
the payload iterator is closed and ``held`` (the admission permit and the engine's
stream) is closed after it, shielded from cancellation.

This replaced sse-starlette's EventSourceResponse, whose every event took a lock, a
cancel scope and an event object (about a tenth of medserve's CPU when relaying a fast
vLLM's tokens to 64 clients, py-spy).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Mapping
from contextlib import AsyncExitStack, aclosing

import anyio
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

PING_S = 15.0  # a quiet stream's keep-alive comment, as sse-starlette sent it
PING = b": ping\n\n"
HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    # nginx buffers proxied responses unless told not to: events would arrive in bursts.
    (b"x-accel-buffering", b"no"),
]


def event(payload: str) -> bytes:
    """The bytes of one event carrying ``payload``. Raises UnicodeEncodeError for a
    string without a UTF-8 form (a lone surrogate)."""
    if "\n" in payload or "\r" in payload:
        lines = payload.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        return "".join(f"data: {line}\n" for line in lines).encode() + b"\n"
    return b"data: " + payload.encode() + b"\n\n"


class EventStream(Response):
    """An SSE response of ``payloads`` (see the module docstring) that, once sent or
    abandoned, closes ``held``. ``headers``: more response headers. A Starlette Response
    (FastAPI passes one through as it is), though none of its body machinery is used."""

    def __init__(
        self,
        payloads: AsyncGenerator[str, None],
        held: AsyncExitStack,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._payloads = payloads
        self._held = held
        self.status_code = 200
        self.background = None
        extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        self.raw_headers = [*HEADERS, *extra]
        self._sent_at = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            with anyio.CancelScope() as gone:
                watcher = asyncio.create_task(_cancel_on_disconnect(receive, gone))
                try:
                    await self._stream(send)
                finally:
                    watcher.cancel()
            if self.background is not None and not gone.cancel_called:
                await self.background()
        finally:
            with anyio.CancelScope(shield=True):
                await self._held.aclose()

    async def _stream(self, send: Send) -> None:
        start = {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
        await send(start)
        self._sent_at = time.monotonic()
        pinger = asyncio.create_task(self._ping(send))
        try:
            async with aclosing(self._payloads) as payloads:
                async for payload in payloads:
                    body = event(payload)
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                    self._sent_at = time.monotonic()
        finally:
            pinger.cancel()  # before the last message: nothing may follow it
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _ping(self, send: Send) -> None:
        """A comment whenever PING_S seconds passed without an event."""
        while True:
            wait = self._sent_at + PING_S - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            await send({"type": "http.response.body", "body": PING, "more_body": True})
            self._sent_at = time.monotonic()


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    # The request body has been read: the next message is the disconnect.
    message: Message = await receive()
    while message["type"] != "http.disconnect":
        message = await receive()
    scope.cancel()
