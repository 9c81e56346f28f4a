"""The real llama.cpp engine on the packaged SmolLM2 model, in-process.

Independent oracles where there are some: the prompt is rendered with plain Jinja2 from the
template read out of the GGUF file, and tokenized by a separate vocab-only llama.cpp
instance; stop sequences are checked against an unstopped run of the same greedy decode.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import jinja2
import pytest
from llama_cpp import Llama, llama_model_get_vocab, llama_vocab_is_eog

from medserve.config import SamplingDefaults
from medserve.engines.base import Message
from medserve.engines.llamacpp import LlamaCppEngine
from tests.conftest import flat_spec, smollm2_path
from tests.integration.common import collect, request

pytestmark = [pytest.mark.engine, pytest.mark.anyio]

QUESTION = (Message("user", "List three common symptoms of type 2 diabetes."),)
# Greedy with no repeat penalty, SmolLM2 loops on this prompt until max_tokens (checked:
# 1500 of 1500 tokens), so a request on it runs for many seconds unless it is stopped.
ENDLESS = (
    Message("user", "Write a long, detailed essay on the history of medicine, with many sections."),
)
LOOP = {"temperature": 0.0, "repeat_penalty": 1.0}


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def engine() -> AsyncIterator[LlamaCppEngine]:
    spec = flat_spec(
        id="smollm2",
        path=smollm2_path(),
        context_length=2048,
        defaults=SamplingDefaults(repeat_penalty=1.3),
    )
    e = LlamaCppEngine(spec)
    await e.start()
    yield e
    await e.close()


@pytest.fixture(scope="module")
def vocab() -> Llama:
    return Llama(model_path=str(smollm2_path()), vocab_only=True, verbose=False)


async def test_chat_prompt_matches_independent_rendering(
    engine: LlamaCppEngine, vocab: Llama
) -> None:
    prompt = await engine.render_chat(QUESTION)
    template = vocab.metadata["tokenizer.chat_template"]
    expected = (
        jinja2.Environment()
        .from_string(template)
        .render(
            messages=[{"role": "user", "content": QUESTION[0].content}], add_generation_prompt=True
        )
    )
    assert prompt.text == expected
    assert list(prompt.token_ids) == vocab.tokenize(expected.encode(), add_bos=True, special=True)
    assert "<|im_start|>assistant" in prompt.text


async def test_usage_counts_and_length_finish(engine: LlamaCppEngine) -> None:
    prompt = await engine.render_chat(QUESTION)
    text, last = await collect(engine, request(QUESTION, max_tokens=12))
    assert text.strip()
    assert last.finish_reason == "length"
    assert last.completion_tokens == 12
    assert last.prompt_tokens == len(prompt.token_ids)


async def test_greedy_is_deterministic_and_stop_cuts_exactly(engine: LlamaCppEngine) -> None:
    prompt = QUESTION
    first, _ = await collect(engine, request(prompt, max_tokens=40))
    second, _ = await collect(engine, request(prompt, max_tokens=40))
    assert first == second
    assert len(first) > 20
    stop = first[len(first) // 2 : len(first) // 2 + 4]
    assert stop.strip(), "pick a visible stop string"
    stopped, last = await collect(engine, request(prompt, max_tokens=40, stop=(stop,)))
    assert stopped == first[: first.index(stop)]
    assert last.finish_reason == "stop"


async def test_seeded_sampling_is_reproducible(engine: LlamaCppEngine) -> None:
    prompt = QUESTION
    a, _ = await collect(engine, request(prompt, temperature=0.9, seed=1234))
    b, _ = await collect(engine, request(prompt, temperature=0.9, seed=1234))
    assert a == b


@pytest.mark.parametrize("seed", [1, 2])
async def test_top_p_zero_is_greedy(engine: LlamaCppEngine, seed: int) -> None:
    """OpenAI allows top_p 0 and reads it as greedy: at a high temperature and any seed,
    the same text as temperature 0."""
    prompt = QUESTION
    greedy, _ = await collect(engine, request(prompt))
    top_p_zero, _ = await collect(engine, request(prompt, temperature=1.5, top_p=0.0, seed=seed))
    assert top_p_zero == greedy


async def test_completion_prompt_does_not_parse_control_tokens(engine: LlamaCppEngine) -> None:
    plain = await engine.render_text("<|im_start|>")
    chat = await engine.render_chat((Message("user", "x"),))
    im_start = chat.token_ids[0]
    assert im_start not in plain.token_ids


async def test_closing_the_stream_stops_generation(engine: LlamaCppEngine) -> None:
    prompt = ENDLESS
    before = engine.generated_tokens
    stream = engine.generate(request(prompt, "cancel-me", max_tokens=1000, **LOOP))
    received = [await anext(stream) for _ in range(3)]
    await stream.aclose()
    assert all(c.finish_reason is None for c in received)
    generated = engine.generated_tokens - before
    assert generated < 100, f"worker kept decoding after the consumer left: {generated}"
    health = await engine.health()
    assert (health.ready, health.running, health.waiting) == (True, 0, 0)
    # The model is free again: the next request runs to completion.
    _, last = await collect(engine, request(prompt, max_tokens=4))
    assert last.completion_tokens == 4


async def test_sampler_chain_agrees_with_llama_cpp_pythons_own_loop(
    engine: LlamaCppEngine,
) -> None:
    """Same sampler chain as the library's generate(): the greedy answers start the same.

    Not token for token over a long answer: the scheduler's multi-sequence context has
    another KV layout than the library's single-sequence one, float rounding differs, and
    greedy paths can part after a few dozen tokens. A wrong sampler chain (penalties,
    cut-offs) shows in the first tokens.
    """
    prompt = await engine.render_chat(QUESTION)
    text, _ = await collect(engine, request(QUESTION, max_tokens=12))
    oracle = Llama(
        model_path=str(smollm2_path()), n_ctx=2048, n_threads=engine_threads(), verbose=False
    )
    vocab = llama_model_get_vocab(oracle.model)
    pieces = []
    for token in oracle.generate(
        list(prompt.token_ids), top_k=40, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.3
    ):
        if llama_vocab_is_eog(vocab, token):
            break
        pieces.append(oracle.detokenize([token]))
        if len(pieces) == 12:
            break
    oracle.close()
    assert text[:30] == b"".join(pieces).decode("utf-8", "replace")[:30]


def engine_threads() -> int:
    import os

    return os.cpu_count() or 1


async def test_cancel_during_a_long_prefill(vocab: Llama) -> None:
    """A request cancelled while its prompt is evaluated stops within one n_batch chunk."""
    spec = flat_spec(id="small-batch", path=smollm2_path(), context_length=2048, batch_size=32)
    e = LlamaCppEngine(spec)
    await e.start()
    try:
        text = " ".join(["hypertension"] * 1200)
        total = len((await e.render_text(text)).token_ids)
        assert total > 1000
        stream = e.generate(request(text, "long", max_tokens=4))
        first = asyncio.ensure_future(anext(stream, None))
        # Wait (bounded) until the prefill is under way, then cancel (the consumer leaves).
        for _ in range(500):
            if e.prompt_tokens_evaluated >= 32:
                break
            await asyncio.sleep(0.01)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first  # ended without a single chunk
        assert e.prompt_tokens_evaluated < total
        assert (await e.health()).running == 0
    finally:
        await e.close()


async def test_tokens_longer_than_32_bytes_are_generated_whole(engine: LlamaCppEngine) -> None:
    """Issue 12.1: SmolLM2 answers this with a newline plus 47 spaces, one 48-byte token."""
    rows = "".join(f"row {i}:\n" + " " * 48 + f"value {i}\n" for i in range(1, 7)) + "row 7:"
    prompt = rows
    text, last = await collect(engine, request(prompt, max_tokens=6, repeat_penalty=1.0))
    assert last.completion_tokens == 6
    assert text.startswith("\n" + " " * 47), repr(text)
