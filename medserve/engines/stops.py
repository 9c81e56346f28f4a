"""Incremental stop-sequence matching over streamed text, shared by every engine.

Text that might be the start of a stop sequence is held back until the next piece shows
whether it is, so a client never receives part of a stop sequence, and the final text is
identical whether it was streamed or not.
"""

from __future__ import annotations


class StopMatcher:
    """Feed text pieces; get back what is safe to emit, and whether a stop was hit."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._hold = max((len(s) for s in self._stops), default=0) - 1
        self._buffer = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add ``piece``; return the text that can be emitted now."""
        if self.stopped:
            return ""
        if not self._stops:
            return piece
        self._buffer += piece
        cut = min(
            (i for i in (self._buffer.find(s) for s in self._stops) if i >= 0),
            default=-1,
        )
        if cut >= 0:
            self.stopped = True
            text, self._buffer = self._buffer[:cut], ""
            return text
        keep = self._partial_suffix()
        text = self._buffer[: len(self._buffer) - keep]
        self._buffer = self._buffer[len(self._buffer) - keep :]
        return text

    def flush(self) -> str:
        """End of generation: release whatever was held back."""
        text, self._buffer = ("" if self.stopped else self._buffer), ""
        return text

    def _partial_suffix(self) -> int:
        """Length of the longest buffer suffix that is a proper prefix of some stop."""
        longest = 0
        for n in range(1, min(self._hold, len(self._buffer)) + 1):
            tail = self._buffer[-n:]
            if any(s.startswith(tail) for s in self._stops):
                longest = n
        return longest
