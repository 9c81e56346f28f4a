"""What every engine must do, run on each engine kind (fake; llama.cpp on SmolLM2; vllm on
the fake OpenAI upstream of tests/fakeupstream.py).

An engine takes a GenerationRequest (messages or prompt text), renders and checks it
itself, and streams text chunks then exactly one final chunk with the finish reason and
token counts; errors are typed MedserveErrors; closing the iterator cancels and frees the
slot. Real-engine cases use tiny budgets.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from medserve.engines.base import Engine, GenerationChunk, GenerationRequest, Message, Sampling
from medserve.engines.fake import FakeEngine
from medserve.errors import ContextLengthError, MedserveError
from tests.conftest import fake_spec, flat_spec, smollm2_path
from tests.fakeupstream import FakeUpstream, Knobs, running_upstream

pytestmark = pytest.mark.anyio

CONTEXT = 256
CHAT = (Message("user", "Name one symptom of asthma, in one word."),)
TEXT = "one two three four five six seven eight nine ten eleven twelve"


def fake(request: pytest.FixtureRequest) -> Engine:
    return FakeEngine(fake_spec(context_length=CONTEXT))


def llamacpp(request: pytest.FixtureRequest) -> Engine:
    from medserve.engines.llamacpp import LlamaCppEngine

    spec = flat_spec(id="smollm2", path=smollm2_path(), context_length=CONTEXT, parallel=2)
    return LlamaCppEngine(spec)


def vllm(request: pytest.FixtureRequest) -> Engine:
    """The vllm engine on the fake upstream; its context comes from the upstream's
    /v1/models (``max_model_len``)."""
    from medserve.engines.vllm import VllmEngine, VllmSpec

    upstream: FakeUpstream = request.getfixturevalue("upstream")
    upstream.knobs = Knobs(context=CONTEXT, served="m-upstream")
    replica = VllmSpec(engine="vllm", url=upstream.url, served_model_name="m-upstream")
    return VllmEngine(flat_spec(id="m", engine="fake"), replica)


FACTORIES = [
    pytest.param(fake, id="fake"),
    pytest.param(llamacpp, id="llamacpp", marks=pytest.mark.engine),
    pytest.param(vllm, id="vllm"),
]


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with running_upstream() as server:
        yield server


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module", params=FACTORIES)
async def engine(request: pytest.FixtureRequest) -> AsyncIterator[Engine]:
    factory: Callable[[pytest.FixtureRequest], Engine] = request.param
    e = factory(request)
    await e.start()
    yield e
    await e.close()


def req(
    source: str | tuple[Message, ...] = TEXT,
    max_tokens: int | None = 4,
    param: str = "max_tokens",
    stop: tuple[str, ...] = (),
    rid: str = "c",
) -> GenerationRequest:
    sampling = Sampling(
        max_tokens=max_tokens,
        max_tokens_param=param,
        temperature=0.0,
        top_p=1.0,
        top_k=40,
        min_p=0.0,
        repeat_penalty=1.0,
        frequency_penalty=0.0,
        presence_penalty=0.0,
        seed=1,
        stop=stop,
        default_max_tokens=4,
    )
    if isinstance(source, str):
        return GenerationRequest(rid, "m", sampling, prompt=source)
    return GenerationRequest(rid, "m", sampling, messages=source)


async def drain(e: Engine, r: GenerationRequest) -> list[GenerationChunk]:
    return [c async for c in e.generate(r)]


async def test_info_and_health_after_start(engine: Engine) -> None:
    info = engine.info
    assert info.kind in ("fake", "llamacpp", "vllm") and info.context_length == CONTEXT
    assert info.capacity is None or info.capacity > 0
    h = await engine.health()
    assert (h.ready, h.running, h.waiting) == (True, 0, 0)


@pytest.mark.parametrize("source", [TEXT, CHAT], ids=["prompt", "messages"])
async def test_text_chunks_then_one_final_chunk_with_counts(
    engine: Engine, source: str | tuple[Message, ...]
) -> None:
    chunks = await drain(engine, req(source, max_tokens=3))
    *body, last = chunks
    assert all(c.finish_reason is None for c in body)
    assert last.finish_reason in ("stop", "length")
    assert last.prompt_tokens and last.prompt_tokens > 0
    assert last.completion_tokens is not None and 0 < last.completion_tokens <= 3


async def test_max_tokens_is_respected_with_finish_length(engine: Engine) -> None:
    last = (await drain(engine, req(max_tokens=2)))[-1]
    assert (last.finish_reason, last.completion_tokens) == ("length", 2)


async def test_a_stop_string_ends_the_text_before_it(engine: Engine) -> None:
    full = "".join(c.text for c in await drain(engine, req(max_tokens=6)))
    stop = full.strip()[:2]
    assert stop, "the engine produced no text to stop on"
    chunks = await drain(engine, req(max_tokens=6, stop=(stop,)))
    text = "".join(c.text for c in chunks)
    assert stop not in text and full.startswith(text)
    assert chunks[-1].finish_reason == "stop"


@pytest.mark.parametrize(
    ("source", "max_tokens", "param"),
    [
        (" ".join(["word"] * (CONTEXT + 10)), 1, "prompt"),
        ((Message("user", " ".join(["word"] * (CONTEXT + 10))),), 1, "messages"),
        (TEXT, CONTEXT, "max_tokens"),
        (CHAT, CONTEXT, "max_completion_tokens"),
    ],
    ids=["prompt", "messages", "max_tokens", "max_completion_tokens"],
)
async def test_context_overflow_names_the_param_before_any_chunk(
    engine: Engine, source: str | tuple[Message, ...], max_tokens: int, param: str
) -> None:
    stream = engine.generate(req(source, max_tokens=max_tokens, param=param))
    with pytest.raises(ContextLengthError) as info:
        await anext(stream)
    assert info.value.param == param
    assert info.value.prompt_tokens is not None  # the tokenized prompt is charged
    assert "word" not in info.value.message


async def test_closing_early_cancels_and_frees_the_slot(engine: Engine) -> None:
    stream = engine.generate(req(max_tokens=10))
    first = await anext(stream)
    assert first.finish_reason is None
    await stream.aclose()
    h = await engine.health()
    assert (h.running, h.waiting) == (0, 0)
    last = (await drain(engine, req(max_tokens=2)))[-1]  # the slot takes the next one
    assert last.completion_tokens == 2


async def test_errors_are_typed(engine: Engine) -> None:
    for bad in (req((Message("user", "x " * 400),)), req(TEXT, max_tokens=CONTEXT * 2)):
        with pytest.raises(MedserveError):
            await drain(engine, bad)


@pytest.mark.parametrize("factory", FACTORIES)
async def test_close_is_idempotent_and_health_says_not_ready(
    factory: Callable[[pytest.FixtureRequest], Engine], request: pytest.FixtureRequest
) -> None:
    e = factory(request)
    await e.start()
    await e.close()
    await e.close()
    assert (await e.health()).ready is False
    with pytest.raises(MedserveError):
        await drain(e, req())
