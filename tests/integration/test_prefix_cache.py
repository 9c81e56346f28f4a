"""Prefix KV reuse on the real model: answers equal to those computed from scratch.

Every case runs the same token prompts on two engines that differ only in ``prefix_cache``
(on, off) and compares the greedy answers exactly. Prompts are token tuples handed to the
scheduler directly, so where a reused head ends (mid-block, one token before a chunk
boundary, the whole prompt but its last token) is chosen by the test, not by a tokenizer.
"""

from __future__ import annotations

import asyncio
import ctypes
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from medserve.config import ModelSpec
from medserve.engines.base import GenerationChunk
from medserve.engines.batching import Item, Job, Scheduler
from medserve.engines.llamacpp import LlamaCppEngine
from tests.conftest import smollm2_path
from tests.integration.common import request

pytestmark = [pytest.mark.engine, pytest.mark.anyio]

GREEDY = request("x", max_tokens=12, repeat_penalty=1.0).sampling
RULES = (
    "Hospital policy for the clinical assistant. Answer in plain English for ward staff. "
    "Never give a dose without naming the route and the frequency. Refer to the local "
    "antimicrobial guideline for empirical therapy and check allergies before advising. "
)
GUIDELINE = (
    "Guideline excerpt {n}: adults with community acquired pneumonia are assessed with the "
    "CURB-65 score; a score of two or more suggests hospital review, and three or more "
    "suggests assessment for intensive care. Oxygen targets are 94 to 98 percent unless the "
    "patient is at risk of hypercapnia, where 88 to 92 percent applies. "
)
QUESTIONS = [
    "Question: what does a CURB-65 score of 3 suggest?",
    "Question: which oxygen target applies with COPD?",
    "Question: what must a dose recommendation include?",
    "Question: what should be checked before advising antibiotics?",
    "Question: summarise the policy in one sentence.",
    "Question: who is the audience of the answers?",
    "Question: when is intensive care considered?",
    "Question: name one risk for hypercapnia.",
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def spec(**overrides: object) -> ModelSpec:
    replica: dict[str, object] = {
        "engine": "llamacpp",
        "path": smollm2_path(),
        "context_length": 1024,
        "parallel": 4,
    }
    replica.update(overrides)
    return ModelSpec.model_validate({"id": "m", "replicas": [replica]})


@pytest.fixture
async def engines(request: pytest.FixtureRequest) -> AsyncIterator[tuple[LlamaCppEngine, ...]]:
    """(cached, reference): the same replica with the prefix cache on and off."""
    overrides: dict[str, object] = getattr(request, "param", {})
    cached = LlamaCppEngine(spec(**overrides))
    reference = LlamaCppEngine(spec(**{**overrides, "prefix_cache": False}))
    await cached.start()
    await reference.start()
    yield cached, reference
    try:
        assert await cached.occupied_sequences() == []
        assert await reference.occupied_sequences() == []
        assert await reference.kept_tokens() == [0] * reference.parallel
    finally:
        await cached.close()
        await reference.close()


async def tokens(e: LlamaCppEngine, text: str) -> tuple[int, ...]:
    return (await e.render_text(text)).token_ids


async def preamble(e: LlamaCppEngine, at_least: int, variant: int = 0) -> tuple[int, ...]:
    """A hospital system prompt of at least ``at_least`` tokens (``variant`` changes all of
    it, from its first block on)."""
    text = f"Site {variant}. " + RULES
    n = 0
    while len(await tokens(e, text)) < at_least:
        text += GUIDELINE.format(n=n)
        n += 1
    return await tokens(e, text)


def scheduler(e: LlamaCppEngine) -> Scheduler:
    assert e._scheduler is not None
    return e._scheduler


async def answer(
    e: LlamaCppEngine,
    prompt: tuple[int, ...],
    salt: str | None = None,
    submitted: Callable[[Job], None] = lambda job: None,
) -> str:
    """The greedy completion of a token prompt (12 tokens), run on ``e``'s scheduler."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Item] = asyncio.Queue()

    def emit(item: Item) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    job = Job(
        prompt=prompt,
        sampling=GREEDY,
        max_tokens=12,
        emit=emit,
        deadline=time.monotonic() + 600,
        salt=salt,
    )
    scheduler(e).submit(job)
    submitted(job)
    parts = []
    while (item := await queue.get()) is not None:
        if isinstance(item, BaseException):
            raise item
        assert isinstance(item, GenerationChunk)
        parts.append(item.text)
    return "".join(parts)


async def references(e: LlamaCppEngine, prompts: list[tuple[int, ...]]) -> list[str]:
    return [await answer(e, p) for p in prompts]


@pytest.fixture
def logits(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every logits row the scheduler samples from, in order (a spy on llama.cpp's sampling
    call: the values are llama.cpp's own, the sampling goes on unchanged)."""
    import llama_cpp

    rows: list[bytes] = []
    sample = llama_cpp.llama_sampler_sample

    def spy(sampler: Any, ctx: Any, index: int) -> int:
        model = llama_cpp.llama_get_model(ctx)
        n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        rows.append(ctypes.string_at(llama_cpp.llama_get_logits_ith(ctx, index), 4 * n_vocab))
        return int(sample(sampler, ctx, index))

    monkeypatch.setattr(llama_cpp, "llama_sampler_sample", spy)
    return rows


async def kept_state(e: LlamaCppEngine, salt: str | None, prompt: tuple[int, ...]) -> bytes:
    """The KV a free slot keeps of ``prompt`` (all but its last token), as llama.cpp's
    sequence state: equal bytes from the same sequence mean bit-identical keys and values."""
    sched = scheduler(e)

    def read() -> bytes:
        for seq, held in enumerate(sched._held):
            if held.salt == salt and held.tokens == prompt[:-1]:
                return sched._save(seq)
        raise AssertionError("no slot keeps this prompt")

    return await asyncio.wrap_future(sched.probe(read))


@pytest.mark.parametrize("engines", [{"parallel": 1}], indirect=True)
async def test_reuse_leaves_greedy_answers_unchanged(
    engines: tuple[LlamaCppEngine, LlamaCppEngine], logits: list[bytes]
) -> None:
    """One primed head (600+ tokens), then prompts that reuse it up to many kinds of end.

    One slot, so that states compare byte for byte (they name their sequence) and each
    prompt alternates with a salted one: heads go to the host store and come back."""
    cached, reference = engines
    head = await preamble(cached, 600)
    q = [await tokens(cached, " " + text) for text in QUESTIONS[:3]]
    cases = {
        "same head, other question": head + q[1],
        "same head, third question": head + q[2],
        "diverges mid-block (300)": head[:300] + q[1],
        "diverges one past a chunk (257)": head[:257] + q[2],
        "diverges one before a chunk boundary (255)": head[:255] + q[1],
        "a strict head of the cached prompt": head[:450],
        "head ending one past a chunk": head[:513],
        "head ending on a chunk boundary": head[:512],
        "head ending one before a chunk boundary": head[:511],
        "the primed prompt itself": head + q[0],
    }
    expected = await references(reference, list(cases.values()))
    before = cached.prefix_cache_stats()
    await answer(cached, head + q[0])  # primes the cache
    got = {}
    for name, p in cases.items():
        start = len(logits)
        got[name] = await answer(cached, p)
        computed = await kept_state(cached, None, p), logits[start:]
        # The same prompt under a salt of its own is computed from scratch: the KV built
        # on a reused head and every logits row sampled from must be the same bytes.
        start = len(logits)
        assert await answer(cached, p, salt=name) == got[name]
        assert (await kept_state(cached, name, p), logits[start:]) == computed, name
    assert got == dict(zip(cases, expected, strict=True))
    stats = cached.prefix_cache_stats()
    assert before is not None and stats is not None
    assert stats.misses - before.misses == 1 + len(cases)  # the primer, each salted run
    assert stats.hits - before.hits == len(cases)
    reused = stats.reused_tokens - before.reused_tokens
    assert reused >= sum(min(len(p), 257) - 2 for p in cases.values())


@pytest.mark.parametrize("engines", [{"parallel": 8}], indirect=True)
async def test_eight_concurrent_users_prefill_a_shared_head_once(
    engines: tuple[LlamaCppEngine, LlamaCppEngine],
) -> None:
    """Eight requests arriving together with one preamble (mixed lengths): one computes it,
    the others copy it from that slot, and every answer is the one computed alone."""
    cached, reference = engines
    head = await preamble(cached, 500)
    q = [await tokens(cached, " " + text) for text in QUESTIONS]
    prompts = [head + q[i] for i in range(5)] + [head[:200] + q[5], head[:400] + q[6], head + q[7]]
    expected = await references(reference, prompts)
    evaluated = scheduler(cached).prompt_tokens_evaluated
    got = await asyncio.gather(*(answer(cached, p) for p in prompts))
    assert list(got) == expected
    stats = cached.prefix_cache_stats()
    assert stats is not None and (stats.misses, stats.hits) == (1, 7)
    # The head was evaluated once (plus each request's own tail), not eight times.
    assert scheduler(cached).prompt_tokens_evaluated - evaluated < 2 * len(head)
    assert stats.reused_tokens > 5 * len(head)


@pytest.mark.parametrize("engines", [{"parallel": 2, "prefix_cache_mib": 9}], indirect=True)
async def test_eviction_under_memory_pressure_while_requests_run(
    engines: tuple[LlamaCppEngine, LlamaCppEngine],
) -> None:
    """Three preambles take turns in two slots with room for about one saved head: heads are
    saved, dropped and restored while other requests decode, and no answer changes."""
    cached, reference = engines
    heads = [await preamble(cached, 200, variant=v) for v in range(3)]
    q = [await tokens(cached, " " + text) for text in QUESTIONS]
    prompts = [heads[i % 3] + q[i % 8] for i in range(12)]
    expected = await references(reference, prompts)
    got = await asyncio.gather(*(answer(cached, p) for p in prompts))
    assert list(got) == expected
    stats = cached.prefix_cache_stats()
    assert stats is not None
    assert stats.evictions > 0 and stats.hits > 0
    assert stats.bytes <= stats.capacity_bytes == 9 * 2**20


async def test_cancelling_the_request_computing_a_shared_head(
    engines: tuple[LlamaCppEngine, LlamaCppEngine],
) -> None:
    """The first request is cancelled halfway through prefilling the preamble the others
    wait for: they reuse what it computed and answer as if alone."""
    cached, reference = engines
    head = await preamble(cached, 700)
    q = [await tokens(cached, " " + text) for text in QUESTIONS[:3]]
    expected = await references(reference, [head + q[1], head + q[2]])
    first: list[Job] = []
    computing = asyncio.ensure_future(answer(cached, head + q[0], submitted=first.append))
    others = [asyncio.ensure_future(answer(cached, head + q[i])) for i in (1, 2)]
    sched = scheduler(cached)

    def cancel_mid_prefill() -> bool:
        slot = next((s for s in sched._slots if s.job is first[0]), None)
        if slot is not None and 0 < slot.prefilled < len(slot.prompt):
            first[0].cancel.set()
            return True
        return False

    for _ in range(20_000):  # bounded: until the probe, between two steps, cancels it
        if await asyncio.wrap_future(sched.probe(cancel_mid_prefill)):
            break
    assert first[0].cancel.is_set()
    assert await asyncio.gather(*others) == expected
    assert await computing == ""  # ended without an answer when cancelled
    stats = cached.prefix_cache_stats()
    assert stats is not None and stats.hits == 2 and stats.misses == 1


@pytest.mark.parametrize("engines", [{"context_length": 320}], indirect=True)
async def test_reuse_near_the_end_of_the_context(
    engines: tuple[LlamaCppEngine, LlamaCppEngine],
) -> None:
    """A cached prompt longer than what a later request has room to reuse, and a later
    prompt that ends at the context's last cell."""
    cached, reference = engines
    head = await preamble(cached, 300)
    long, short = head[:300], head[:250]
    edge = head[:308]  # + 12 tokens of answer = all 320 cells
    expected = await references(reference, [short, edge])
    await answer(cached, long)
    assert [await answer(cached, short), await answer(cached, edge)] == expected


async def test_a_salt_keeps_prefixes_apart(
    engines: tuple[LlamaCppEngine, LlamaCppEngine],
) -> None:
    """Requests reuse each other's heads only with equal salts (the key's, when a model
    isolates its cache per key)."""
    cached, reference = engines
    head = await preamble(cached, 200)
    q = [await tokens(cached, " " + text) for text in QUESTIONS[:4]]
    expected = await references(reference, [head + q[i] for i in range(4)])
    runs: list[tuple[str | None, int, str]] = [
        ("key-a", 0, "miss"),
        ("key-b", 1, "miss"),
        (None, 2, "miss"),
        ("key-a", 3, "hit"),
    ]
    for salt, i, outcome in runs:
        before = cached.prefix_cache_stats()
        assert await answer(cached, head + q[i], salt=salt) == expected[i]
        after = cached.prefix_cache_stats()
        assert before is not None and after is not None
        assert (after.hits - before.hits, after.misses - before.misses) == (
            (1, 0) if outcome == "hit" else (0, 1)
        )
