"""Exact vocabulary access (medserve.engines.vocab) on the packaged SmolLM2 vocabulary.

Oracles: llama.cpp's own ``llama_detokenize`` over the whole vocabulary, the length
``llama_token_to_piece`` reports for each token, llama-cpp-python's ``tokenize`` (which
retries correctly at the reported size), and the GGUF file read by the ``gguf`` package.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from llama_cpp import Llama, llama_model_n_ctx_train

from medserve.engines.vocab import Segment, Vocab, metadata
from tests.conftest import smollm2_path

pytestmark = pytest.mark.engine

# llama-cpp-python's token_to_piece and detokenize buffers.
LIBRARY_BUFFER = 32


@pytest.fixture(scope="module")
def llama() -> Llama:
    return Llama(model_path=str(smollm2_path()), vocab_only=True, verbose=False)


@pytest.fixture(scope="module")
def vocab(llama: Llama) -> Vocab:
    return Vocab(llama)


def test_every_token_round_trips(vocab: Vocab) -> None:
    """Pieces of all tokens, concatenated, are the detokenized bytes of all of them, and
    no piece is shorter than the length llama.cpp reports for it."""
    tokens = list(range(vocab.n_tokens))
    pieces = [vocab.piece(t) for t in tokens]
    for t, piece in zip(tokens, pieces, strict=True):
        assert len(piece) == vocab.piece_length(t), t
    assert b"".join(pieces) == vocab.detokenize(tokens)
    long = [t for t, p in zip(tokens, pieces, strict=True) if len(p) > LIBRARY_BUFFER]
    assert len(long) >= 10, "SmolLM2 has dozens of tokens longer than 32 bytes"
    assert vocab.max_piece_bytes == max(len(p) for p in pieces) > LIBRARY_BUFFER


def test_newline_indentation_token_is_whole(vocab: Vocab) -> None:
    """The token of the issue: a newline plus 47 spaces, 48 bytes."""
    (token,) = vocab.tokenize(b"\n" + b" " * 47, add_special=False, special=False)
    assert vocab.piece(token) == b"\n" + b" " * 47


def _long_text() -> bytes:
    return ("hypertension " * 9000).encode()  # > n_ctx_train (8192) tokens


KINDS: list[tuple[str, Callable[[Llama, Vocab], tuple[object, object]]]] = [
    (
        "token_to_piece, piece longer than the first buffer",
        lambda llama, v: (
            v.piece(_indent(v), first=4),
            b"\n" + b" " * 47,
        ),
    ),
    (
        "detokenize, text longer than the first buffer",
        lambda llama, v: (
            v.detokenize(v.tokenize(_long_text(), add_special=False, special=False), first=16),
            _long_text(),
        ),
    ),
    (
        "tokenize, more ids than the first guess",
        lambda llama, v: (
            v.tokenize(_long_text(), add_special=True, special=False, capacity=8),
            llama.tokenize(_long_text(), add_bos=True, special=False),
        ),
    ),
    (
        "tokenize, more ids than n_ctx_train",
        lambda llama, v: (
            v.tokenize(_long_text(), add_special=False, special=False),
            llama.tokenize(_long_text(), add_bos=False, special=False),
        ),
    ),
    (
        "metadata, chat template longer than the first buffer",
        lambda llama, v: (metadata(llama, "tokenizer.chat_template", first=16), _gguf_template()),
    ),
    (
        "metadata, chat template at the default buffer",
        lambda llama, v: (metadata(llama, "tokenizer.chat_template"), _gguf_template()),
    ),
    (
        "metadata, value of exactly the first buffer's length",
        lambda llama, v: (
            metadata(
                llama,
                "tokenizer.chat_template",
                first=len(_gguf_template().encode()),
            ),
            _gguf_template(),
        ),
    ),
    ("metadata, absent key", lambda llama, v: (metadata(llama, "no.such.key"), None)),
    (
        "special token text for the template (BOS/EOS)",
        lambda llama, v: (v.text(v.eos), "<|im_end|>"),
    ),
]


def test_long_text_has_more_tokens_than_n_ctx_train(llama: Llama, vocab: Vocab) -> None:
    trained = int(llama_model_n_ctx_train(llama.model))
    assert len(vocab.tokenize(_long_text(), add_special=False, special=False)) > trained


def _indent(v: Vocab) -> int:
    (token,) = v.tokenize(b"\n" + b" " * 47, add_special=False, special=False)
    return token


def _gguf_template() -> str:
    """The chat template as the ``gguf`` package reads it from the file (independent)."""
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(smollm2_path()))
    field = reader.fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


@pytest.mark.parametrize(("kind", "check"), KINDS, ids=[k for k, _ in KINDS])
def test_no_fixed_buffer_or_guess(
    kind: str, check: Callable[[Llama, Vocab], tuple[object, object]], llama: Llama, vocab: Vocab
) -> None:
    got, expected = check(llama, vocab)
    assert got == expected


def test_plain_encode_matches_whole_tokenization(llama: Llama, vocab: Vocab) -> None:
    """Client text alone: the ids of llama.cpp's own tokenization with specials off."""
    text = "Patient, 54, reports <|im_end|> chest pain;\n    BP 150/95 \u00e9\u4e2d"
    assert vocab.encode([Segment(text, client=True)]) == llama.tokenize(
        text.encode(), add_bos=True, special=False
    )


def test_quantize_evaluation_tokenizes_exactly(llama: Llama) -> None:
    """`medserve quantize`'s llama.cpp tokenization (a child process) goes through Vocab:
    a text longer than n_ctx_train tokens, with control-token text kept plain."""
    from medserve.quantize.evaluate import llama_tokenize

    text = _long_text().decode() + "<|im_end|>"
    expected = llama.tokenize(text.encode(), add_bos=True, special=False)
    assert llama_tokenize(smollm2_path(), text, True) == expected
