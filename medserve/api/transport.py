"""Connection-level limits the HTTP server lacks: a header deadline and a connection cap.

uvicorn closes a connection that stays idle after a response (``timeout_keep_alive``), but
it sets no deadline on a connection that has not yet sent a complete request head: a
client that opens a socket and trickles one header line every few seconds (slowloris), or
sends nothing at all, holds it for ever. Its ``limit_concurrency`` answers 503 to *every*
request once the count is reached, existing connections included.

:func:`protocol` builds uvicorn's h11 protocol with three additions, each bounded:

- **Header deadline**: while the server waits for a request head (a fresh connection, or
  one whose previous response is complete), the head must be complete within
  ``header_timeout_s`` of when the wait began. Arriving bytes do not extend it. When it
  passes, the connection is closed without a response.
- **Unread body after a response**: when the response went out before the client finished
  sending its body (a 401 or 413 answered early), the rest must arrive within
  ``body_timeout_s`` or the connection is closed. A body the application is reading is
  bounded by :class:`medserve.api.middleware.RequestContext` (408).
- **Connection cap**: a connection opened while ``max_connections`` others are open gets
  one 503 ``overloaded`` (with ``Retry-After`` and ``Connection: close``) for its first
  request, then is closed; the open ones are served as usual.

- **Malformed requests**: what h11 cannot parse gets OpenAI's envelope (400) with the
  headers every medserve response carries, not uvicorn's plain text.

Neither deadline runs while a request is being handled, so a long stream is never cut.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from medserve.api.middleware import SECURITY_HEADERS
from medserve.errors import InvalidRequestError, MedserveError, OverloadedError, envelope

RETRY_AFTER_S = 1


@dataclass(frozen=True)
class ConnectionLimits:
    """Seconds and counts from the settings (see :class:`medserve.config.Settings`)."""

    header_timeout_s: float
    body_timeout_s: float
    max_connections: int


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline and a connection cap (module doc)."""

    limits: ClassVar[ConnectionLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._deadline_phase: str | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # adds this connection to the open ones
        if len(self.connections) > self.limits.max_connections:
            # uvicorn answers through `self.app` for each request head: this connection's
            # only answer is the refusal, and `Connection: close` ends it after that.
            self.app = _refuse
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse (a bad request line, a NUL in a header, two
        Content-Length headers...): OpenAI's envelope with the headers every medserve
        response carries, instead of uvicorn's plain text. It never reaches the app, so it
        has no audit record; uvicorn logs it. ``msg`` (h11's words) is not sent."""
        body, headers = _answer(_MALFORMED)
        self.transport.write(
            self.conn.send(
                h11.Response(
                    status_code=_MALFORMED.status,
                    headers=headers,
                    reason=HTTPStatus(_MALFORMED.status).phrase,
                )
            )
        )
        self.transport.write(self.conn.send(h11.Data(data=body)))
        self.transport.write(self.conn.send(h11.EndOfMessage()))
        self.transport.close()

    def _watch(self) -> None:
        """Arm the deadline of the phase the connection is in, or disarm it."""
        if self.transport is None or self.transport.is_closing():
            self._disarm()
            return
        theirs = self.conn.their_state
        answered = self.cycle is None or self.cycle.response_complete
        phase: str | None = None
        if theirs is h11.IDLE and answered:
            phase = "header"  # waiting for (the rest of) a request head
        elif theirs is h11.SEND_BODY and answered and self.cycle is not None:
            phase = "body"  # answered already; the client is still sending its body
        if phase is None:
            self._disarm()
        elif phase != self._deadline_phase:
            self._disarm()
            limits = self.limits
            delay = limits.header_timeout_s if phase == "header" else limits.body_timeout_s
            self._deadline = self.loop.call_later(delay, self._expire)
            self._deadline_phase = phase

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = None
        self._deadline_phase = None

    def _expire(self) -> None:
        self._deadline = None
        self._deadline_phase = None
        if not self.transport.is_closing():
            self.transport.close()


def protocol(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` bound to ``limits``, for ``uvicorn.Config(http=...)``."""
    return type("MedserveH11Protocol", (GuardedH11Protocol,), {"limits": limits})


_REFUSAL = OverloadedError(
    "This server has too many open connections; retry shortly.", retry_after=RETRY_AFTER_S
)
_MALFORMED = InvalidRequestError("The HTTP request is malformed.")


def _answer(error: MedserveError) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """Body and headers of an answer given below the app: the envelope, ``Retry-After``
    where the error has one, a fresh X-Request-Id, the security headers, and
    ``Connection: close`` (the connection ends after it)."""
    body = json.dumps(envelope(error)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", uuid.uuid4().hex.encode()),
        *SECURITY_HEADERS,
        (b"connection", b"close"),
    ]
    if error.retry_after is not None:
        headers.append((b"retry-after", str(error.retry_after).encode()))
    return body, headers


async def _refuse(scope: Any, receive: Any, send: Any) -> None:
    body, headers = _answer(_REFUSAL)
    await send({"type": "http.response.start", "status": _REFUSAL.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
