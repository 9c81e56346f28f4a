"""Server-sent events as the tests read them: one parser for every suite."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

DONE = "[DONE]"


def payloads(lines: Iterable[str]) -> list[str]:
    """The raw ``data:`` payloads of SSE lines, in order (``[DONE]`` included)."""
    return [line[6:] for line in lines if line.startswith("data: ")]


def events(text_or_lines: str | Iterable[str]) -> list[Any]:
    """The ``data:`` payloads of an SSE body (text or lines), JSON-decoded; ``[DONE]``
    stays the string ``"[DONE]"``."""
    lines = text_or_lines.splitlines() if isinstance(text_or_lines, str) else text_or_lines
    return [p if p == DONE else json.loads(p) for p in payloads(lines)]
