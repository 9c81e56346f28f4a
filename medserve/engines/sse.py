"""An incremental Server-Sent Events framer for upstream streams (bytes in, events out).

Upstream bytes arrive in whatever pieces the network makes: an event may be split across
reads, and a read may end inside a multi-byte UTF-8 character. :class:`SSEFramer` keeps
the bytes of an unfinished line, splits complete lines on ``\\n`` (a ``\\r`` before it is
dropped, so ``\\r\\n`` works too) and ends an event at a blank line. Only complete lines
are decoded: ``\\n`` is ASCII and never part of a multi-byte character, so a character
split across reads is joined before decoding. Multi-line ``data:`` fields are joined with
``\\n`` as the SSE specification says; comments (``:``) and ``id``/``retry`` are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

# The longest unfinished event kept: an upstream that never ends its event must not grow
# the gateway's memory without bound. vLLM's events are a few hundred bytes.
MAX_EVENT_BYTES = 1 << 20


class SSEError(ValueError):
    """The byte stream is not valid SSE (an event too long, or not UTF-8)."""


@dataclass(frozen=True, slots=True)
class Event:
    """One dispatched SSE event: its ``event`` name (``message`` by default) and ``data``."""

    data: str
    event: str = "message"


class SSEFramer:
    """Feed bytes with :meth:`feed`; it returns the events those bytes completed."""

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._max = max_event_bytes
        self._partial = bytearray()  # bytes of the unfinished line
        self._data: list[str] = []
        self._event = ""
        self._size = 0  # bytes of the unfinished event so far

    def feed(self, chunk: bytes) -> list[Event]:
        """The events completed by ``chunk`` (possibly none). Raises SSEError."""
        self._partial += chunk
        out: list[Event] = []
        start = 0
        while (end := self._partial.find(b"\n", start)) != -1:
            line = bytes(self._partial[start:end])
            start = end + 1
            event = self._line(line[:-1] if line.endswith(b"\r") else line)
            if event is not None:
                out.append(event)
        del self._partial[:start]
        if self._size + len(self._partial) > self._max:
            raise SSEError(f"an SSE event is longer than {self._max} bytes")
        return out

    def _line(self, line: bytes) -> Event | None:
        if not line:
            return self._dispatch()
        self._size += len(line) + 1
        if self._size > self._max:
            raise SSEError(f"an SSE event is longer than {self._max} bytes")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise SSEError("an SSE line is not valid UTF-8") from None
        if text.startswith(":"):
            return None
        name, _, value = text.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None

    def _dispatch(self) -> Event | None:
        data, event = self._data, self._event
        self._data, self._event, self._size = [], "", 0
        if not data:
            return None
        return Event("\n".join(data), event or "message")
