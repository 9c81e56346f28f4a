"""Continuous batching on the real model: many requests share each decode step.

Each test builds its own small engine (loading SmolLM2 takes a fraction of a second) with
the slot count and limits it needs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from medserve.config import ModelSpec
from medserve.engines.base import GenerationChunk, Message
from medserve.engines.llamacpp import LlamaCppEngine
from medserve.errors import OverloadedError, RequestTimeoutError
from medserve.router import Router, Served
from tests.conftest import smollm2_path
from tests.integration.common import collect, request

pytestmark = [pytest.mark.engine, pytest.mark.anyio]

QUESTIONS = [
    "List three common symptoms of type 2 diabetes.",
    "What is hypertension?",
    "How is asthma treated?",
    "Explain what an MRI scan does.",
]
# Greedy, no repeat penalty: SmolLM2 repeats "la" until max_tokens (checked: 4000 of 4000).
ENDLESS = "la " * 50


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def engine(**overrides: object) -> LlamaCppEngine:
    spec = {"id": "m", "path": smollm2_path(), "context_length": 1024, "parallel": 4}
    spec.update(overrides)
    return LlamaCppEngine(ModelSpec.model_validate(spec))


@pytest.fixture
async def four() -> AsyncIterator[LlamaCppEngine]:
    e = engine()
    await e.start()
    yield e
    await e.close()


async def test_concurrent_greedy_equals_sequential(four: LlamaCppEngine) -> None:
    prompts = [(Message("user", q),) for q in QUESTIONS]
    alone = [
        (await collect(four, request(p, f"s{i}", max_tokens=40)))[0] for i, p in enumerate(prompts)
    ]
    together = await asyncio.gather(
        *(collect(four, request(p, f"c{i}", max_tokens=40)) for i, p in enumerate(prompts))
    )
    assert [text for text, _ in together] == alone
    assert all(text.strip() for text in alone)


async def test_stop_and_max_tokens_per_request_in_a_shared_batch(four: LlamaCppEngine) -> None:
    prompt = (Message("user", QUESTIONS[0]),)
    full, last = await collect(four, request(prompt, "full", max_tokens=40))
    stop = full[10:14]
    results = await asyncio.gather(
        collect(four, request(prompt, "a", max_tokens=40)),
        collect(four, request(prompt, "b", max_tokens=5)),
        collect(four, request(prompt, "c", max_tokens=40, stop=(stop,))),
        collect(four, request(ENDLESS, "d", max_tokens=17, repeat_penalty=1.0)),
    )
    (a, la), (b, lb), (c, lc), (_, ld) = results
    assert a == full and la.completion_tokens == last.completion_tokens
    assert last.completion_tokens is not None and last.completion_tokens > 14
    assert lb.finish_reason == "length" and lb.completion_tokens == 5 and full.startswith(b)
    assert c == full[: full.index(stop)] and lc.finish_reason == "stop"
    assert ld.finish_reason == "length" and ld.completion_tokens == 17


async def test_a_disconnect_frees_its_slot_for_the_next_requests() -> None:
    e = engine(parallel=2, max_queue=0)
    await e.start()
    try:
        endless = ENDLESS
        streams = [
            e.generate(request(endless, f"long{i}", max_tokens=900, repeat_penalty=1.0))
            for i in range(2)
        ]
        for s in streams:
            await anext(s)
        assert (await e.health()).running == 2
        for s in streams:
            await s.aclose()
        health = await e.health()
        assert (health.running, health.waiting) == (0, 0)
        # Both slots are free again: the next two requests run to completion.
        done = await asyncio.gather(
            *(collect(e, request(endless, f"next{i}", max_tokens=6)) for i in range(2))
        )
        assert [last.completion_tokens for _, last in done] == [6, 6]
        assert await e.occupied_sequences() == []
    finally:
        await e.close()


async def test_queue_full_is_overloaded_and_the_queue_still_drains() -> None:
    """The router admits parallel + max_queue (the engine's capacity), refuses the next
    with 503 + Retry-After, and the engine's queue drains."""
    e = engine(parallel=1, max_queue=1)
    router = Router([Served(e._model, (e,))])
    await router.start()
    served = router.get("m")
    try:
        assert e.info.capacity == 2

        async def admitted(rid: str, **sampling: object) -> tuple[str, GenerationChunk]:
            async with router.admit(served) as engine_:
                return await collect(engine_, request(ENDLESS, rid, **sampling))

        running = asyncio.ensure_future(admitted("run", max_tokens=60, repeat_penalty=1.0))
        waiting = asyncio.ensure_future(admitted("wait", max_tokens=5))
        for _ in range(1000):  # bounded: until one runs and one waits in the engine
            h = await e.health()
            if (h.running, h.waiting) == (1, 1):
                break
            await asyncio.sleep(0.01)
        assert (h.running, h.waiting) == (1, 1)
        with pytest.raises(OverloadedError) as info:
            async with router.admit(served):
                pass
        assert info.value.status == 503 and info.value.retry_after
        assert router.health(served).rejected == 1
        _, last = await running
        assert last.finish_reason == "length"
        _, last = await waiting
        assert last.completion_tokens == 5
        assert router.load(e).outstanding == 0
    finally:
        await router.close()


async def test_timeout_frees_the_slot() -> None:
    e = engine(parallel=1, timeout_s=0.3)
    await e.start()
    try:
        endless = ENDLESS
        with pytest.raises(RequestTimeoutError):
            await collect(e, request(endless, "slow", max_tokens=960, repeat_penalty=1.0))
        health = await e.health()
        assert (health.running, health.waiting) == (0, 0)
        assert await e.occupied_sequences() == []
    finally:
        await e.close()


async def test_no_kv_cells_leak_after_100_mixed_requests() -> None:
    e = engine(parallel=4, max_queue=200)
    await e.start()
    try:
        prompts = [(Message("user", q),) for q in QUESTIONS]
        endless = ENDLESS

        async def one(i: int) -> None:
            kind = i % 4
            if kind == 0:  # finishes by length
                await collect(e, request(prompts[i % 4], f"r{i}", max_tokens=1 + i % 7))
            elif kind == 1:  # stop sequence hit early
                await collect(e, request(prompts[i % 4], f"r{i}", max_tokens=30, stop=(" ",)))
            elif kind == 2:  # client leaves after the first chunk
                s = e.generate(request(endless, f"r{i}", max_tokens=500, repeat_penalty=1.0))
                await anext(s)
                await s.aclose()
            else:  # sampled, seeded
                await collect(e, request(prompts[i % 4], f"r{i}", max_tokens=5, temperature=0.9))

        await asyncio.gather(*(one(i) for i in range(100)))
        health = await e.health()
        assert (health.running, health.waiting) == (0, 0)
        assert await e.occupied_sequences() == []
    finally:
        await e.close()
