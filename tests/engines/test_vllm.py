"""The vllm engine against the fake OpenAI upstream: each failure knob gives the right
chunks or typed error, usage is exact, cancellation reaches the upstream, headers are the
allow-list's only, and the SSE framer survives any split of the bytes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import anyio
import httpx
import pytest
from pydantic import SecretStr

from medserve.engines.base import GenerationChunk, GenerationRequest, Message, Sampling
from medserve.engines.sse import SSEFramer
from medserve.engines.upstream import prompt_token_bound, text_token_bound
from medserve.engines.vllm import VllmEngine, VllmSpec, upstream_hosts
from medserve.errors import (
    ContextLengthError,
    EngineError,
    InvalidRequestError,
    MedserveError,
    OverloadedError,
    RequestTimeoutError,
    UnavailableError,
)
from tests.conftest import flat_spec
from tests.e2e.test_tls import self_signed
from tests.fakeupstream import FakeUpstream, Knobs, running_upstream
from tests.serverproc import free_port

pytestmark = pytest.mark.anyio
TEXT = "héllo wörld 🙂 ünïcode ok"  # multi-byte characters: 2- and 4-byte UTF-8


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with running_upstream() as server:
        yield server


@pytest.fixture
async def engine(upstream: FakeUpstream) -> AsyncIterator[VllmEngine]:
    upstream.knobs = Knobs()
    spec = VllmSpec(
        engine="vllm",
        url=upstream.url,
        served_model_name="m",
        api_key=SecretStr("replica-key"),
        read_timeout_s=2.0,
        first_event_timeout_s=2.0,
    )
    e = VllmEngine(flat_spec(id="med", engine="fake"), spec)
    await e.start()
    yield e
    await e.close()


def req(chat: bool = True, max_tokens: int | None = 8) -> GenerationRequest:
    s = Sampling(
        max_tokens=max_tokens,
        temperature=0.5,
        top_p=0.9,
        top_k=7,
        min_p=0.05,
        repeat_penalty=1.1,
        frequency_penalty=0.1,
        presence_penalty=0.2,
        seed=3,
    )
    if chat:
        return GenerationRequest("r1", "med", s, messages=(Message("user", "a b c"),))
    return GenerationRequest("r1", "med", s, prompt="a b c d")


async def drain(e: VllmEngine, r: GenerationRequest) -> list[GenerationChunk]:
    return [c async for c in e.generate(r)]


OK = "ok"


@pytest.mark.parametrize(
    ("knobs", "expected"),
    [
        (Knobs(text=TEXT), OK),
        (Knobs(text=TEXT, split=True), OK),
        (Knobs(text=TEXT, usage_in_last=True), OK),
        (Knobs(text=TEXT, ttft_s=0.05, token_delay_s=0.01), OK),
        (Knobs(status=503, retry_after="7"), OverloadedError),
        (Knobs(status=429), OverloadedError),
        (Knobs(status=500), EngineError),
        (Knobs(status=400), InvalidRequestError),
        (Knobs(status=404), EngineError),  # the served name is the operator's, not the client's
        (Knobs(status=401), EngineError),  # the replica key is wrong: not the client's fault
        (Knobs(text=TEXT, error_after=0), EngineError),
        (Knobs(text=TEXT, error_after=2), EngineError),
        (Knobs(text=TEXT, drop_after=2), EngineError),
        (Knobs(text=TEXT, stall_after=2), RequestTimeoutError),
        (Knobs(text=TEXT, stall_before_headers_s=30), RequestTimeoutError),
        (Knobs(text=TEXT, ttft_s=30), RequestTimeoutError),
    ],
    ids=[
        "plain",
        "split-inside-utf8",
        "usage-on-last-chunk",
        "ttft-and-delay",
        "503",
        "429",
        "500",
        "400",
        "404",
        "401",
        "error-event-first",
        "error-event-mid",
        "dropped",
        "stall-mid",
        "stall-before-headers",
        "stall-before-first-event",
    ],
)
@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
async def test_knob_table(
    engine: VllmEngine, upstream: FakeUpstream, knobs: Knobs, expected: object, chat: bool
) -> None:
    upstream.knobs = knobs
    if expected == OK:
        chunks = await drain(engine, req(chat))
        *body, last = chunks
        assert "".join(c.text for c in chunks) == " ".join(TEXT.split()[:8])
        assert all(c.finish_reason is None for c in body) and len(body) == len(TEXT.split())
        assert last.finish_reason == "stop"
        prompt = 4 if not chat else 5  # "user: a b c\nassistant:" is 5 words
        assert (last.prompt_tokens, last.completion_tokens) == (prompt, len(TEXT.split()))
        return
    assert isinstance(expected, type)
    with pytest.raises(MedserveError) as info:
        await drain(engine, req(chat))
    assert type(info.value) is expected
    assert upstream.url.split("//")[1] not in info.value.message
    assert "a b c" not in info.value.message and "upstream says" not in info.value.message
    if knobs.retry_after:
        assert info.value.retry_after == int(knobs.retry_after)


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
async def test_reasoning_and_unknown_delta_fields_pass_through(
    engine: VllmEngine, upstream: FakeUpstream, field: str
) -> None:
    unknown = {"unknown": {"k": [1, "ü"]}}
    upstream.knobs = Knobs(
        text="a b",
        reasoning="think it over",
        reasoning_field=field,
        delta_extra={**unknown, "empty": None},  # a null field adds nothing
    )
    *body, last = await drain(engine, req())
    assert [(c.text, c.extra) for c in body] == [
        ("", {field: "think"}),
        ("", {field: " it"}),
        ("", {field: " over"}),
        ("a", unknown),
        (" b", unknown),
    ]
    assert (last.text, last.extra, last.completion_tokens) == ("", None, 5)


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        ("tool_calls", "tool_calls"),
        ("content_filter", "content_filter"),
        ("length", "length"),
        ("a-reason-from-the-future", "stop"),
        ("abort", EngineError),
        ("error", EngineError),
    ],
)
async def test_finish_reasons(
    engine: VllmEngine, upstream: FakeUpstream, sent: str, expected: object
) -> None:
    upstream.knobs = Knobs(text=TEXT, finish=sent)
    if isinstance(expected, str):
        assert (await drain(engine, req()))[-1].finish_reason == expected
        return
    with pytest.raises(EngineError):
        await drain(engine, req())


async def test_length_finish_and_sampling_names_upstream(
    engine: VllmEngine, upstream: FakeUpstream
) -> None:
    last = (await drain(engine, req(chat=False, max_tokens=2)))[-1]
    assert (last.finish_reason, last.completion_tokens) == ("length", 2)
    body = upstream.seen[-1].body
    assert body["model"] == "m" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    expected = {"temperature": 0.5, "top_p": 0.9, "top_k": 7, "min_p": 0.05, "seed": 3}
    expected |= {"repetition_penalty": 1.1, "frequency_penalty": 0.1, "presence_penalty": 0.2}
    assert {k: body[k] for k in expected} == expected and body["max_tokens"] == 2
    await drain(engine, req(max_tokens=None))
    assert "max_tokens" not in upstream.seen[-1].body  # the upstream's default applies


async def test_headers_are_the_allow_list_and_request_ids_fresh(
    engine: VllmEngine, upstream: FakeUpstream
) -> None:
    await drain(engine, req())
    await drain(engine, req())
    first, second = (s.headers for s in upstream.seen[-2:])
    assert first["authorization"] == "Bearer replica-key"
    assert (
        first["x-request-id"].startswith("r1-") and first["x-request-id"] != second["x-request-id"]
    )
    assert not {h for h in first if h.startswith("x-") and h != "x-request-id"}
    assert "cookie" not in first


@pytest.mark.parametrize("knobs", [Knobs(text=TEXT), Knobs(text=TEXT, split=True)])
async def test_a_finished_stream_leaves_its_connection_to_the_next_request(
    engine: VllmEngine, upstream: FakeUpstream, knobs: Knobs
) -> None:
    # Read to the end of the body after [DONE], the connection goes back to the pool; a
    # response closed before its end would cost every request a new connection.
    upstream.knobs = knobs
    for _ in range(3):
        assert (await drain(engine, req(max_tokens=None)))[-1].finish_reason == "stop"
    peers = [s.peer for s in upstream.seen[-3:]]
    assert peers[0] is not None and peers == [peers[0]] * 3


async def test_concurrent_requests_reuse_their_connections(upstream: FakeUpstream) -> None:
    # 24 requests at once over the lanes of a replica taking 32, twice: the second wave
    # finds the first wave's connections kept (httpx keeps only 20 idle ones by default).
    upstream.knobs = Knobs(text=TEXT, ttft_s=0.05)
    spec = VllmSpec(engine="vllm", url=upstream.url, served_model_name="m", max_outstanding=32)
    e = VllmEngine(flat_spec(id="med", engine="fake"), spec)
    await e.start()
    try:
        waves = []
        for _ in range(2):
            before = len(upstream.seen)
            answers = await asyncio.gather(*(drain(e, req(max_tokens=None)) for _ in range(24)))
            assert all(a[-1].finish_reason == "stop" for a in answers)
            waves.append({s.peer for s in upstream.seen[before:]})
    finally:
        await e.close()
    assert len(waves[0]) == 24 and waves[1] <= waves[0]


@pytest.mark.parametrize("stage", ["before-headers", "first-event", "streaming"])
async def test_closing_the_iterator_reaches_the_upstream(
    engine: VllmEngine, upstream: FakeUpstream, stage: str
) -> None:
    upstream.knobs = {
        "before-headers": Knobs(stall_before_headers_s=30),
        "first-event": Knobs(ttft_s=30),
        "streaming": Knobs(text=TEXT, stall_after=2),
    }[stage]
    stream = engine.generate(req())
    if stage == "streaming":
        assert (await anext(stream)).text
        await stream.aclose()
    else:
        with anyio.move_on_after(0.3):  # the client leaves while its first chunk is awaited
            await anext(stream)
        await stream.aclose()
    seen = upstream.seen[-1]
    assert await anyio.to_thread.run_sync(seen.left.wait, 10)
    assert (await engine.health()).running == 0


async def test_context_overflow_carries_prompt_tokens(
    engine: VllmEngine, upstream: FakeUpstream
) -> None:
    upstream.knobs = Knobs(context=32)
    with pytest.raises(MedserveError) as info:
        await drain(engine, req(max_tokens=30))
    assert (info.value.param, info.value.prompt_tokens) == ("max_tokens", 5)


# vLLM 0.32.0's own 400 messages (captured from the real server, tests/vllm): the budget
# alone over max_model_len, and a prompt over the context.
@pytest.mark.parametrize(
    ("message", "param", "prompt_tokens"),
    [
        (
            "max_tokens=16385 cannot be greater than max_model_len=16384. Please request "
            "fewer output tokens. (parameter=max_tokens, value=16385)",
            "max_tokens",
            0,
        ),
        (
            "This model's maximum context length is 16384 tokens. However, your prompt "
            "contains at least 16385 input tokens, which exceeds this limit even without any "
            "output tokens. Please reduce the length of the input prompt. "
            "(parameter=input_tokens, value=16385)",
            "messages",
            16385,
        ),
    ],
    ids=["budget", "prompt"],
)
async def test_vllm_032_context_messages_are_context_errors(
    engine: VllmEngine, message: str, param: str, prompt_tokens: int
) -> None:
    body = {"error": {"message": message, "type": "BadRequestError", "code": 400}}
    raw = httpx.ByteStream(json.dumps(body).encode())  # unread, as a streamed response
    error = await engine._refusal(req(max_tokens=16385), httpx.Response(400, stream=raw))
    assert isinstance(error, ContextLengthError)
    assert (error.param, error.prompt_tokens) == (param, prompt_tokens)
    # Worded from what is known: the context medserve read at start, no "?" for a count
    # vLLM did not give.
    assert "context window of 256 tokens" in error.message and "?" not in error.message


async def test_start_refuses_a_missing_name_and_an_unreachable_server(
    upstream: FakeUpstream,
) -> None:
    upstream.knobs = Knobs()
    model = flat_spec(id="med", engine="fake")
    missing = VllmEngine(model, VllmSpec(engine="vllm", url=upstream.url, start_timeout_s=2))
    with pytest.raises(EngineError, match="served_model_name"):
        await missing.start()
    url = f"http://127.0.0.1:{free_port()}"
    down = VllmEngine(model, VllmSpec(engine="vllm", url=url, start_timeout_s=1))
    with pytest.raises(EngineError, match="not ready"):
        await down.start()
    with pytest.raises(UnavailableError):
        await drain(down, req())


async def test_health_follows_the_upstream_probe(
    engine: VllmEngine, upstream: FakeUpstream
) -> None:
    engine._spec = engine._spec.model_copy(update={"health_ttl_s": 0.0})
    upstream.knobs = Knobs(health=503)
    assert (await engine.health()).ready is False
    upstream.knobs = Knobs()
    assert (await engine.health()).ready is True


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64])
def test_framer_survives_any_split(size: int) -> None:
    events = [{"t": "ü🙂é"}, {"t": "a\u00e9"}, {"usage": {"prompt_tokens": 3}}]
    raw = b": comment\r\n\r\n" + b"".join(
        b"data: " + json.dumps(e, ensure_ascii=False).encode() + b"\r\n\r\n" for e in events
    )
    raw += b"data: [DONE]\n\n"
    framer = SSEFramer()
    got = [e.data for i in range(0, len(raw), size) for e in framer.feed(raw[i : i + size])]
    assert [json.loads(d) for d in got[:-1]] == events and got[-1] == "[DONE]"


def test_upstream_hosts_are_the_vllm_replicas_hosts() -> None:
    a = flat_spec(id="a", engine="vllm", url="http://gpu-node-1:8000")
    b = flat_spec(id="b", engine="fake")
    assert upstream_hosts([a, b]) == ["gpu-node-1"]


@pytest.mark.parametrize("url", ["ftp://x", "http://x/v1", "http://u:p@x", "x:8000"])
def test_spec_refuses_urls_that_are_not_a_base(url: str) -> None:
    with pytest.raises(ValueError, match="url"):
        VllmSpec(engine="vllm", url=url)


async def test_top_p_zero_is_sent_as_greedy(engine: VllmEngine, upstream: FakeUpstream) -> None:
    """OpenAI's top_p 0 (greedy) is outside vLLM's (0, 1]: it goes up as temperature 0."""
    r = req()
    greedy = replace(r, sampling=replace(r.sampling, top_p=0.0))
    await drain(engine, greedy)
    body = upstream.seen[-1].body
    assert (body["temperature"], body["top_p"]) == (0.0, 1.0)


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
@pytest.mark.parametrize("salt", [None, "0123456789ab"], ids=["shared", "salted"])
async def test_cache_salt_is_relayed_only_when_set(
    engine: VllmEngine, upstream: FakeUpstream, chat: bool, salt: str | None
) -> None:
    """A salted request carries vLLM's `cache_salt` field (its prefix cache then reuses
    blocks only between equal salts); an unsalted one leaves the field out."""
    await drain(engine, replace(req(chat=chat), cache_salt=salt))
    body = upstream.seen[-1].body
    assert body.get("cache_salt", "absent") == (salt or "absent")


@pytest.mark.parametrize(
    ("upstream_param", "param"),
    [
        ("top_p", "top_p"),
        ("repetition_penalty", "repeat_penalty"),
        ("secret_x", None),
        (None, None),
    ],
)
async def test_an_upstream_refusal_names_the_field_only_when_known(
    engine: VllmEngine, upstream: FakeUpstream, upstream_param: str | None, param: str | None
) -> None:
    upstream.knobs = Knobs(status=400, error_param=upstream_param)
    with pytest.raises(InvalidRequestError) as caught:
        await drain(engine, req())
    assert caught.value.param == param
    assert "a b c" not in caught.value.message  # the upstream's message echoes the prompt
    assert (f"`{param}`" in caught.value.message) == (param is not None)


async def test_start_stops_at_once_when_the_server_refuses_the_key(
    upstream: FakeUpstream,
) -> None:
    upstream.knobs = Knobs(key="right")
    spec = VllmSpec(
        engine="vllm", url=upstream.url, served_model_name="m", api_key=SecretStr("wrong")
    )
    e = VllmEngine(flat_spec(id="med", engine="fake"), spec)
    # start_timeout_s is 120 s: a refusal that were retried would not end this test soon.
    with pytest.raises(EngineError, match="refused medserve's key"):
        await asyncio.wait_for(e.start(), 30)
    upstream.knobs = Knobs(key="right")
    ok = VllmEngine(
        flat_spec(id="med", engine="fake"), spec.model_copy(update={"api_key": SecretStr("right")})
    )
    await ok.start()
    await ok.close()


async def test_an_https_replica_is_verified_against_its_ca_file(tmp_path: Path) -> None:
    """A replica behind an internal CA: trusted with `ca_file`, refused without it (the
    certificate is checked, never skipped)."""
    cert, key = self_signed(tmp_path)
    model = flat_spec(id="med", engine="fake")
    with running_upstream(tls=(cert, key)) as tls_upstream:
        tls_upstream.knobs = Knobs()
        spec = VllmSpec(engine="vllm", url=tls_upstream.url, served_model_name="m", ca_file=cert)
        trusted = VllmEngine(model, spec)
        await trusted.start()
        try:
            chunks = await drain(trusted, req())
        finally:
            await trusted.close()
        assert chunks[-1].finish_reason is not None
        untrusted = VllmEngine(
            model, spec.model_copy(update={"ca_file": None, "start_timeout_s": 1})
        )
        with pytest.raises(EngineError, match="not ready"):
            await untrusted.start()


# (max_tokens, the budget check's answer: None = generates, else the param refused). The
# fake counts a word a token; req()'s chat prompt renders to 5 words; the context is 256.
BUDGETS: dict[str, tuple[int | None, str | None]] = {
    "fits": (251, None),
    "one-past": (252, "max_tokens"),
    "no-budget": (None, None),
}


@pytest.mark.parametrize("case", list(BUDGETS))
async def test_a_budget_past_the_window_is_refused_before_generating(
    engine: VllmEngine, upstream: FakeUpstream, case: str
) -> None:
    """vLLM would cut such an answer at the window silently: /tokenize counts first."""
    max_tokens, refused = BUDGETS[case]
    upstream.tokenized.clear()
    before = len(upstream.seen)
    if refused is None:
        await drain(engine, req(max_tokens=max_tokens))
        assert len(upstream.seen) == before + 1
    else:
        with pytest.raises(ContextLengthError) as caught:
            await drain(engine, req(max_tokens=max_tokens))
        assert (caught.value.param, caught.value.prompt_tokens) == (refused, 5)
        assert len(upstream.seen) == before  # nothing generated
    if max_tokens is None:
        assert upstream.tokenized == []  # the upstream's default budget fits by itself
    else:
        (asked,) = upstream.tokenized
        assert asked["model"] == "m" and asked["add_generation_prompt"] is True
        assert asked["messages"] == [{"role": "user", "content": "a b c"}]


async def test_a_prompt_alone_past_the_window_names_the_input(
    engine: VllmEngine, upstream: FakeUpstream
) -> None:
    long = GenerationRequest("r2", "med", req().sampling, prompt=" ".join(["w"] * 300))
    with pytest.raises(ContextLengthError) as caught:
        await drain(engine, long)
    assert (caught.value.param, caught.value.prompt_tokens) == ("prompt", 300)
    assert "w w" not in caught.value.message


async def test_a_server_without_tokenize_is_asked_once_then_not_checked(
    engine: VllmEngine, upstream: FakeUpstream
) -> None:
    upstream.knobs = Knobs(tokenize=False)
    upstream.tokenized.clear()
    for _ in range(2):
        assert (await drain(engine, req(max_tokens=3)))[-1].finish_reason is not None
    assert len(upstream.tokenized) == 1


@pytest.mark.parametrize(
    ("max_tokens", "slack", "counted", "refused"),
    [
        (100, 1024, False, False),  # bound + budget far inside the window: no round trip
        (100, 9_990, True, False),  # a template that may add that much: counted, fits
        (9_998, 0, True, True),  # the bound passes the window: counted, and refused
    ],
    ids=["surely-fits", "slack-passes-window", "near-the-window"],
)
async def test_the_prompt_is_counted_only_when_it_might_not_fit(
    upstream: FakeUpstream, max_tokens: int, slack: int, counted: bool, refused: bool
) -> None:
    upstream.knobs = Knobs(context=10_000)
    spec = VllmSpec(
        engine="vllm", url=upstream.url, served_model_name="m", budget_slack_tokens=slack
    )
    e = VllmEngine(flat_spec(id="med", engine="fake"), spec)
    await e.start()
    upstream.tokenized.clear()
    try:
        if refused:
            with pytest.raises(ContextLengthError):
                await drain(e, req(max_tokens=max_tokens))
        else:
            assert (await drain(e, req(max_tokens=max_tokens)))[-1].finish_reason is not None
    finally:
        await e.close()
    assert len(upstream.tokenized) == int(counted)


@pytest.mark.parametrize(
    ("text", "bound"),
    [
        ("", 1),
        ("a b c", 6),  # ASCII: one token per byte at most, plus SentencePiece's marker
        ("é", 2 * 11 + 1),  # 2 UTF-8 bytes, each may normalise (NFKC) to 11
        ("a\ufdfa", 1 + 3 * 11 + 1),  # U+FDFA: NFKC's longest expansion (18 characters)
        ("\ud800x", 1 + 3 * 11 + 1),  # a lone surrogate (JSON allows it) counts its 3 bytes
    ],
)
def test_the_token_bound_covers_every_byte_and_normalisation(text: str, bound: int) -> None:
    assert text_token_bound(text) == bound
    body = {"messages": [{"role": "user", "content": text}]}
    assert prompt_token_bound(body, 7) == 7 + text_token_bound("user") + bound
    assert prompt_token_bound({"prompt": text}, 7) == 7 + bound
