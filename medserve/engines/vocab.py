"""Exact access to a llama.cpp vocabulary and metadata: no fixed buffers, no size guesses.

llama-cpp-python's helpers write into fixed buffers: ``token_to_piece`` and ``detokenize``
use 32 bytes (a longer piece, such as SmolLM2's newline plus 47 spaces, comes back empty
because the negative length llama.cpp returns is used as a slice end), ``tokenize`` first
guesses ``n_ctx_train`` ids (and puts the text in its exception message when that fails),
and ``metadata`` retries only when a value is *longer* than its 1024-byte buffer (one of
exactly 1024 bytes loses its last byte to the terminator).

The C functions say how much room they need, and this module uses that:

- ``llama_token_to_piece``, ``llama_detokenize``, ``llama_tokenize`` return the negative of
  the size they need when the buffer is too small; the call is repeated at that size.
- ``llama_model_meta_val_str`` returns ``snprintf``'s length (without the terminator); the
  call is repeated with that length plus one when it did not fit.

Prompts are split at special tokens here, in Python, instead of by llama.cpp's own
partition: llama.cpp's splitting walks its fragment list from the start for every special
token it finds (``std::distance`` and ``std::next`` on a ``forward_list``), quadratic in the
number of special tokens, measured at minutes for 120,000 of them. See :meth:`Vocab.encode`.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llama_cpp import Llama

# llama.h's enum llama_token_attr.
ATTR_UNKNOWN = 1 << 0
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_LSTRIP = 1 << 7
ATTR_RSTRIP = 1 << 8
# llama.h's enum llama_vocab_type: the byte-level tokenizers whose tokens each cover a run
# of input bytes no longer than their piece (see :attr:`Vocab.max_piece_bytes`).
VOCAB_SPM = 1
VOCAB_BPE = 2
# First buffer sizes; a longer result is fetched again at the size llama.cpp reports.
PIECE_BUFFER = 64
METADATA_BUFFER = 4096
# C's isspace() in the "C" locale, which llama.cpp uses for a token's lstrip/rstrip.
C_SPACE = " \t\n\v\f\r"


@dataclass(frozen=True, slots=True)
class Segment:
    """A piece of rendered prompt text: the template's markup, or text from the client."""

    text: str
    client: bool


class Vocab:
    """A loaded model's vocabulary, read through llama.cpp's C API with exact sizes.

    Holds a reference to ``llama`` so the model outlives it. Thread-safe: every call
    allocates its own buffer.
    """

    def __init__(self, llama: Llama) -> None:
        import llama_cpp

        self._llama = llama
        self._lib = llama_cpp
        self._vocab = llama_cpp.llama_model_get_vocab(llama.model)
        self.n_tokens = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.type = int(llama_cpp.llama_vocab_type(self._vocab))
        self.bos = int(llama_cpp.llama_vocab_bos(self._vocab))
        self.eos = int(llama_cpp.llama_vocab_eos(self._vocab))
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self.add_eos = bool(llama_cpp.llama_vocab_get_add_eos(self._vocab))
        attrs = [int(llama_cpp.llama_vocab_get_attr(self._vocab, t)) for t in range(self.n_tokens)]
        self._attrs = attrs
        # Tokens llama.cpp's partition matches as whole strings: control and unknown ones
        # only when parsing specials, user-defined ones always. Longest first, as llama.cpp
        # orders its cache; text -> id (llama.cpp keeps the lowest id for a duplicate text).
        matched = ATTR_CONTROL | ATTR_UNKNOWN | ATTR_USER_DEFINED
        specials: dict[str, int] = {}
        always: dict[str, int] = {}
        for token, attr in enumerate(attrs):
            if attr & matched:
                raw = llama_cpp.llama_vocab_get_text(self._vocab, token)
                text = raw.decode("utf-8", "replace") if raw else ""
                if not text:
                    continue
                specials.setdefault(text, token)
                if attr & ATTR_USER_DEFINED:
                    always.setdefault(text, token)
        self._special = specials
        self._always = always
        self._special_re = _alternation(specials)
        self._always_re = _alternation(always)
        self.max_piece_bytes = max(
            (len(self.piece(t, special=True)) for t in range(self.n_tokens)), default=0
        )

    # -- tokens to text ------------------------------------------------------------------

    def piece(self, token: int, *, special: bool = False, first: int = PIECE_BUFFER) -> bytes:
        """The bytes token ``token`` stands for (control tokens: empty unless ``special``).

        Exact at any length: a piece longer than the first buffer is fetched again at the
        length ``llama_token_to_piece`` reported (as a negative number). ``first``: the
        first buffer's size (tests make it small to exercise the retry).
        """
        size = max(1, first)
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = int(self._lib.llama_token_to_piece(self._vocab, token, buf, size, 0, special))
            if n >= 0:
                return buf.raw[:n]
            size = -n
        raise RuntimeError(f"llama_token_to_piece kept asking for more room (token {token})")

    def piece_length(self, token: int, *, special: bool = False) -> int:
        """How many bytes llama.cpp says the piece of ``token`` has (a zero-size query)."""
        buf = ctypes.create_string_buffer(1)
        n = int(self._lib.llama_token_to_piece(self._vocab, token, buf, 0, 0, special))
        return -n if n < 0 else n

    def detokenize(
        self, tokens: Sequence[int], *, special: bool = False, first: int | None = None
    ) -> bytes:
        """``llama_detokenize`` of the whole sequence, nothing removed (exact size).

        ``first``: the first buffer's size (default 8 bytes a token); retried at the size
        llama.cpp reports.
        """
        if not tokens:
            return b""
        ids = (self._lib.llama_token * len(tokens))(*tokens)
        size = max(1, 8 * len(tokens) if first is None else first)
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = int(
                self._lib.llama_detokenize(self._vocab, ids, len(tokens), buf, size, False, special)
            )
            if n >= 0:
                return buf.raw[:n]
            size = -n
        raise RuntimeError("llama_detokenize kept asking for more room")

    def text(self, token: int) -> str:
        """A special token's text as a chat template writes it (``bos_token``); "" if none."""
        if token < 0:
            return ""
        return self.piece(token, special=True).decode("utf-8", "replace")

    # -- text to tokens ------------------------------------------------------------------

    def tokenize(
        self, text: bytes, *, add_special: bool, special: bool, capacity: int | None = None
    ) -> list[int]:
        """``llama_tokenize`` with room for every id it returns.

        ``capacity`` is the first guess (default: one id per byte plus BOS and EOS, which
        is never too small since every token covers at least one byte); when llama.cpp
        reports it needs more, the call is repeated at that size. Errors never carry the
        text.
        """
        size = len(text) + 2 if capacity is None else max(1, capacity)
        for _ in range(2):
            ids = (self._lib.llama_token * size)()
            n = int(
                self._lib.llama_tokenize(
                    self._vocab, text, len(text), ids, size, add_special, special
                )
            )
            if n >= 0:
                return list(ids[:n])
            size = -n
        raise RuntimeError(f"llama_tokenize failed on a text of {len(text)} bytes")

    def encode(self, segments: Iterable[Segment]) -> list[int]:
        """Token ids of a rendered prompt: only the template's markup may be special.

        Template segments are split at special-token strings (control, unknown and
        user-defined tokens, longest first, as llama.cpp's partition does, with the tokens'
        lstrip/rstrip attributes); client segments only at user-defined tokens, which
        llama.cpp matches even with special parsing off. Text between two special tokens is
        joined across segments and tokenized as one run with special parsing off, so an
        ordinary prompt gives exactly the ids of tokenizing the whole text with specials
        on (tests compare both), and a client string such as ``<|im_end|>`` stays text.

        BOS (and EOS, for vocabularies that add one) is added as llama.cpp's
        ``add_special`` would; a BOS the template wrote itself is not doubled.

        One difference from llama.cpp remains, for overlapping special strings only:
        llama.cpp takes each special token in turn (longest first) over the whole text,
        this takes the leftmost match (longest at a position). No chat template's markup
        has overlapping special tokens; ``tests/integration/test_control_tokens.py``
        checks the ids against llama.cpp's on a table of ordinary conversations.
        """
        items: list[int | str] = []
        for seg in segments:
            pattern = self._always_re if seg.client else self._special_re
            table = self._always if seg.client else self._special
            items.extend(_split(seg.text, pattern, table))
        runs = self._strip(_merge(items))
        out: list[int] = [self.bos] if self.add_bos and self.bos >= 0 else []
        for item in runs:
            if isinstance(item, int):
                out.append(item)
            elif item:
                out.extend(self.tokenize(item.encode("utf-8"), add_special=False, special=False))
        if len(out) >= 2 and out[0] == out[1] == self.bos:
            out = out[1:]  # the template wrote its own BOS
        if self.add_eos and self.eos >= 0:
            out.append(self.eos)
        return out

    def _strip(self, items: list[int | str]) -> list[int | str]:
        """Apply lstrip/rstrip: such a token eats the whitespace next to it (llama.cpp)."""
        out = list(items)
        for i, item in enumerate(out):
            if not isinstance(item, int):
                continue
            attr = self._attrs[item]
            if attr & ATTR_LSTRIP and i > 0 and isinstance(out[i - 1], str):
                out[i - 1] = str(out[i - 1]).rstrip(C_SPACE)
            if attr & ATTR_RSTRIP and i + 1 < len(out) and isinstance(out[i + 1], str):
                out[i + 1] = str(out[i + 1]).lstrip(C_SPACE)
        return out

    def special_occurrences(self, text: str) -> int:
        """How many special-token strings llama.cpp would find in ``text``."""
        return 0 if self._special_re is None else len(self._special_re.findall(text))

    def contains_special(self, text: str) -> bool:
        """Whether ``text`` holds a string llama.cpp would parse as a special token."""
        return self._special_re is not None and self._special_re.search(text) is not None


def metadata(llama: Llama, key: str, *, first: int = METADATA_BUFFER) -> str | None:
    """The GGUF metadata value of ``key`` as a string, whole; None when absent.

    ``llama_model_meta_val_str`` returns the value's length (``snprintf``); when that does
    not fit the buffer with its terminator, the call is repeated with exactly enough room.
    ``first``: the first buffer's size.
    """
    import llama_cpp

    size = max(1, first)
    for _ in range(2):
        buf = ctypes.create_string_buffer(size)
        n = int(llama_cpp.llama_model_meta_val_str(llama.model, key.encode(), buf, size))
        if n < 0:
            return None
        if n < size:
            return buf.raw[:n].decode("utf-8", "replace")
        size = n + 1
    raise RuntimeError(f"metadata value {key!r} kept growing")


def _alternation(texts: dict[str, int]) -> re.Pattern[str] | None:
    if not texts:
        return None
    ordered = sorted(texts, key=lambda t: (-len(t.encode()), texts[t]))
    return re.compile("|".join(re.escape(t) for t in ordered))


def _split(text: str, pattern: re.Pattern[str] | None, table: dict[str, int]) -> list[int | str]:
    if pattern is None:
        return [text]
    out: list[int | str] = []
    at = 0
    for m in pattern.finditer(text):
        out.append(text[at : m.start()])
        out.append(table[m.group()])
        at = m.end()
    out.append(text[at:])
    return out


def _merge(items: list[int | str]) -> list[int | str]:
    """Join adjacent text items (template text around client text is one raw run)."""
    out: list[int | str] = []
    texts: list[str] = []
    for item in items:
        if isinstance(item, str):
            texts.append(item)  # joined once per run: no quadratic string building
            continue
        if texts:
            out.append("".join(texts))
            texts = []
        out.append(item)
    if texts:
        out.append("".join(texts))
    return out
