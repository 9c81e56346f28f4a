"""StopMatcher: held-back text, stops across piece boundaries, flush."""

from __future__ import annotations

import pytest

from medserve.engines.stops import StopMatcher

CASES = [
    # pieces, stops, emitted text, stopped
    (["Hello", " world"], (), "Hello world", False),
    (["Hello", " world"], ("xyz",), "Hello world", False),
    (["Hello", " wor", "ld"], ("world",), "Hello ", True),
    (["abc", "STO", "P", "tail"], ("STOP",), "abc", True),
    (["ST", "ST", "OP"], ("STOP",), "ST", True),
    (["a\n", "\nb"], ("\n\n",), "a", True),
    (["no stop her", "e"], ("here!",), "no stop here", False),
    (["one", "two"], ("two", "ne"), "o", True),
    (["x", "y"], ("",), "xy", False),
]


@pytest.mark.parametrize(("pieces", "stops", "text", "stopped"), CASES)
def test_stop_matcher(pieces: list[str], stops: tuple[str, ...], text: str, stopped: bool) -> None:
    m = StopMatcher(stops)
    out = "".join(m.feed(p) for p in pieces)
    out += m.flush()
    assert out == text
    assert m.stopped is stopped


def test_nothing_after_stop() -> None:
    m = StopMatcher(("END",))
    assert m.feed("aEND") == "a"
    assert m.feed("more") == ""
    assert m.flush() == ""


def test_partial_stop_is_held_back_until_resolved() -> None:
    m = StopMatcher(("STOP",))
    assert m.feed("abST") == "ab"
    assert m.feed("x") == "STx"
