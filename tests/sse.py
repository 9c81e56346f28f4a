"""Server-sent events as the tests read them: one parser for every suite.

The lazy forms (:func:`iter_payloads`, :func:`iter_events`) read a live stream one event
at a time, so a test can stop after the first event (a client that leaves), signal another
thread as events arrive, or time each one; the list forms read a whole body. A lazy reader
of an httpx response that is dropped (garbage-collected) before the end closes the
response's stream, and so the connection: keep it in a name while the connection must
stay open.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

DONE = "[DONE]"


def iter_payloads(lines: Iterable[str]) -> Iterator[str]:
    """The raw ``data:`` payloads of SSE lines (``[DONE]`` included), as the lines arrive:
    pass ``response.iter_lines()`` of an httpx (or TestClient) streaming response."""
    for line in lines:
        if line.startswith("data: "):
            yield line[6:]


def iter_events(lines: Iterable[str]) -> Iterator[Any]:
    """:func:`iter_payloads` JSON-decoded, as they arrive; ``[DONE]`` stays ``"[DONE]"``."""
    for payload in iter_payloads(lines):
        yield payload if payload == DONE else json.loads(payload)


def payloads(lines: Iterable[str]) -> list[str]:
    """The raw ``data:`` payloads of SSE lines, in order (``[DONE]`` included)."""
    return list(iter_payloads(lines))


def events(text_or_lines: str | Iterable[str]) -> list[Any]:
    """The ``data:`` payloads of an SSE body (text or lines), JSON-decoded; ``[DONE]``
    stays the string ``"[DONE]"``."""
    lines = text_or_lines.splitlines() if isinstance(text_or_lines, str) else text_or_lines
    return list(iter_events(lines))
