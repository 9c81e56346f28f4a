"""The stream's events are built as dictionaries for speed: byte for byte what the chunk
models of medserve.api.protocol give (model_construct + model_dump_json(exclude_unset=True),
how serving built them before), for every event kind, chat and completions, usage asked
or not, any text. An engine's extra delta fields reach the client: in each event's delta
when streaming, merged into the message when not (the fake engine, scripted)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st

from medserve.api.answers import DeltaFields, Events, Job, Kind
from medserve.api.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionLogprobs,
    FunctionDeltaOut,
    ToolCallDeltaOut,
    TopLogprob,
    Usage,
)
from medserve.engines.base import (
    GenerationChunk,
    GenerationRequest,
    Message,
    Sampling,
    TokenLogprob,
    ToolCallDelta,
)
from medserve.engines.fake import FakeEngine
from tests.sse import events as sse

SAMPLING = Sampling(
    max_tokens=8,
    temperature=0.5,
    top_p=0.9,
    top_k=7,
    min_p=0.05,
    repeat_penalty=1.1,
    frequency_penalty=0.0,
    presence_penalty=0.0,
    seed=1,
)
TEXTS = [
    " word",
    "héllo wörld 🙂 心臓",
    'quotes " and \\ backslash / slash',
    "".join(chr(i) for i in range(0x20)) + "\x7f\u2028\u2029\ufeff",
]
EXTRAS: list[dict[str, Any]] = [
    {"reasoning_content": "think 🙂"},
    {"reasoning": "a", "unknown": [1, 2.5, True, None, {"k": "ü"}]},
    {"annotations": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]},
]


def job(kind: Kind, include_usage: bool) -> Job:
    if kind == "chat":
        request = GenerationRequest("abc", "med-7b", SAMPLING, messages=(Message("user", "q"),))
    else:
        request = GenerationRequest("abc", "med-7b", SAMPLING, prompt="q")
    return Job(kind, request, True, include_usage, 1700000000, b"q")


def reference(j: Job, choices: list[Any], **extra: Any) -> str:
    """The event as the protocol models serialise it."""
    model = ChatCompletionChunk if j.kind == "chat" else CompletionChunk
    head: dict[str, Any] = {
        "id": j.wire_id,
        "object": "chat.completion.chunk" if j.kind == "chat" else "text_completion",
        "created": j.created,
        "model": j.request.model,
    }
    if j.include_usage:
        head["usage"] = None
    return model.model_construct(**{**head, "choices": choices, **extra}).model_dump_json(
        exclude_unset=True
    )


def choice(j: Job, text: str, finish: str | None, extra: dict[str, Any] | None = None) -> Any:
    fields: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
    if j.kind != "chat":
        return CompletionChunkChoice.model_construct(**fields, text=text)
    content: dict[str, Any] = {"content": text} if text else {}
    delta = ChatDelta.model_construct(**content, **(extra or {}))
    return ChatChunkChoice.model_construct(**fields, delta=delta)


KINDS: tuple[Kind, ...] = ("chat", "completion")
CASES = [(kind, usage) for kind in KINDS for usage in (True, False)]


@pytest.mark.parametrize(("kind", "include_usage"), CASES)
def test_every_event_kind_is_byte_identical_to_the_models(kind: Kind, include_usage: bool) -> None:
    j = job(kind, include_usage)
    events = Events(j)
    for text in TEXTS:
        assert events.piece(text) == reference(j, [choice(j, text, None)])
    for finish in ("stop", "length", "tool_calls"):
        assert events.piece("", finish) == reference(j, [choice(j, "", finish)])
    usage = Usage(prompt_tokens=5, completion_tokens=7, total_tokens=12)
    assert events.usage(usage) == reference(j, [], usage=usage)
    if kind == "chat":
        role = ChatDelta.model_construct(role="assistant", content="")
        first = ChatChunkChoice.model_construct(
            index=0, logprobs=None, finish_reason=None, delta=role
        )
        assert events.role() == reference(j, [first])
        for extra in EXTRAS:
            for text in ("", "x"):
                got = events.piece(text, extra=extra)
                assert got == reference(j, [choice(j, text, None, extra)])


@given(text=st.text(), finish=st.sampled_from([None, "stop", "length"]))
def test_any_text_is_byte_identical(text: str, finish: str | None) -> None:
    for kind, include_usage in CASES:
        j = job(kind, include_usage)
        assert Events(j).piece(text, finish) == reference(j, [choice(j, text, finish)])


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_a_lone_surrogate_raises_as_the_models_do(kind: Kind) -> None:
    j = job(kind, False)
    with pytest.raises(ValueError, match="surrogate"):  # pydantic's error is a ValueError
        reference(j, [choice(j, "a\ud800", None)])
    with pytest.raises(UnicodeEncodeError):
        Events(j).piece("a\ud800")


def test_delta_fields_join_strings_and_keep_the_last_other_value() -> None:
    fields = DeltaFields()
    extras: list[dict[str, Any]] = [
        {"reasoning_content": "Look"},
        {"reasoning_content": None, "score": 1},
        {"reasoning_content": " at it", "score": 2, "calls": [{"i": 0}]},
        {"calls": [{"i": 1}], "later": "x"},
    ]
    for extra in extras:
        fields.add(extra)
    assert fields.merged() == {
        "reasoning_content": "Look at it",
        "score": 2,
        "calls": [{"i": 1}],
        "later": "x",
    }
    assert list(fields.merged()) == ["reasoning_content", "score", "calls", "later"]
    assert DeltaFields().merged() == {}


@pytest.mark.parametrize("field", ["content", "role"])
def test_extra_never_holds_role_or_content(field: str) -> None:
    with pytest.raises(ValueError, match="beyond role and content"):
        GenerationChunk("", extra={field: "x"})


# What a vLLM replica with a reasoning parser streams, as the engine passes it on.
SCRIPT = (
    GenerationChunk("", extra={"reasoning_content": "Think"}),
    GenerationChunk("", extra={"reasoning_content": " twice", "score": 1}),
    GenerationChunk("Answer", extra={"score": 2}),
    GenerationChunk(" here"),
    GenerationChunk("", finish_reason="tool_calls", prompt_tokens=3, completion_tokens=4),
)
CHAT = {"model": "fake-echo", "messages": [{"role": "user", "content": "q"}]}


@pytest.mark.parametrize("include_usage", [True, False])
def test_extra_delta_fields_reach_the_streaming_client_unchanged(
    client: TestClient, fake_engine: FakeEngine, include_usage: bool
) -> None:
    fake_engine.script(*SCRIPT)
    options = {"stream": True, "stream_options": {"include_usage": include_usage}}
    r = client.post("/v1/chat/completions", json={**CHAT, **options})
    events = sse(r.text)
    assert events[-1] == "[DONE]"
    choices = [e["choices"][0] for e in events[:-1] if e["choices"]]
    assert [c["delta"] for c in choices] == [
        {"role": "assistant", "content": ""},
        {"reasoning_content": "Think"},
        {"reasoning_content": " twice", "score": 1},
        {"content": "Answer", "score": 2},
        {"content": " here"},
        {},
    ]
    assert [c["finish_reason"] for c in choices][-2:] == [None, "tool_calls"]
    usage = [e["usage"] for e in events[:-1] if e.get("usage")]
    assert usage == (
        [{"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}] if include_usage else []
    )


def test_extra_delta_fields_are_merged_into_the_message(
    client: TestClient, fake_engine: FakeEngine
) -> None:
    fake_engine.script(*SCRIPT)
    body = client.post("/v1/chat/completions", json=CHAT).json()
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Answer here",
        "refusal": None,
        "reasoning_content": "Think twice",
        "score": 2,
    }
    assert body["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("stream", [True, False])
def test_completions_have_no_delta_for_extra_fields(
    client: TestClient, fake_engine: FakeEngine, stream: bool
) -> None:
    fake_engine.script(*SCRIPT)
    r = client.post("/v1/completions", json={"model": "fake-echo", "prompt": "q", "stream": stream})
    if not stream:
        assert r.json()["choices"][0]["text"] == "Answer here"
        assert set(r.json()["choices"][0]) == {"index", "text", "logprobs", "finish_reason"}
        return
    events = sse(r.text)
    texts = [e["choices"][0]["text"] for e in events[:-1]]
    assert texts == ["Answer", " here", ""]  # no event for a chunk of extra fields only
    assert all(
        set(e["choices"][0]) == {"index", "text", "logprobs", "finish_reason"} for e in events[:-1]
    )


# Typed tool-call pieces and logprobs: the same byte-for-byte rule.
CALLS = [
    (ToolCallDelta(0, "call_1", "lookup_code"),),
    (ToolCallDelta(0, arguments='{"a": "ü'),),
    (ToolCallDelta(0, arguments='"}'), ToolCallDelta(1, "call_2", "other", "{}")),
]
ALT = TokenLogprob("alt", b"alt", -2.5)
LOGPROBS = [
    (TokenLogprob("hé", "hé".encode(), -0.5, (TokenLogprob("hé", "hé".encode(), -0.5), ALT)),),
    (TokenLogprob(" x", b" x", 0.0), TokenLogprob("\ufffd", b"\xe2\x80", -1.25, (ALT,))),
]


def _call_model(d: ToolCallDelta) -> ToolCallDeltaOut:
    head: dict[str, Any] = {} if d.id is None else {"id": d.id, "type": "function"}
    name: dict[str, Any] = {} if d.name is None else {"name": d.name}
    function = FunctionDeltaOut.model_construct(**name, arguments=d.arguments)
    return ToolCallDeltaOut.model_construct(index=d.index, **head, function=function)


def _top(t: TokenLogprob) -> TopLogprob:
    return TopLogprob.model_construct(token=t.token, logprob=t.logprob, bytes=list(t.token_bytes))


def _chat_logprobs(entries: tuple[TokenLogprob, ...]) -> ChatLogprobs:
    content = [
        ChatTokenLogprob.model_construct(
            token=t.token,
            logprob=t.logprob,
            bytes=list(t.token_bytes),
            top_logprobs=[_top(a) for a in t.top],
        )
        for t in entries
    ]
    return ChatLogprobs.model_construct(content=content, refusal=None)


def test_tool_call_pieces_are_byte_identical_to_the_models() -> None:
    j = job("chat", False)
    events = Events(j)
    for calls in CALLS:
        for text in ("", "x"):
            content: dict[str, Any] = {"content": text} if text else {}
            delta = ChatDelta.model_construct(**content, tool_calls=[_call_model(d) for d in calls])
            reference_choice = ChatChunkChoice.model_construct(
                index=0, logprobs=None, finish_reason=None, delta=delta
            )
            assert events.piece(text, tool_calls=calls) == reference(j, [reference_choice])


def test_chat_logprobs_are_byte_identical_to_the_models() -> None:
    j = job("chat", True)
    events = Events(j)
    for entries in LOGPROBS:
        text = "".join(t.token for t in entries)
        got = events.piece(text, logprobs=entries)
        delta = ChatDelta.model_construct(content=text)
        want = ChatChunkChoice.model_construct(
            index=0, logprobs=_chat_logprobs(entries), finish_reason=None, delta=delta
        )
        assert got == reference(j, [want])


def test_completion_logprobs_are_byte_identical_with_running_offsets() -> None:
    j = job("completion", False)
    events = Events(j)
    offset = 0
    for entries in LOGPROBS:
        text = "".join(t.token for t in entries)
        got = events.piece(text, logprobs=entries)
        tops = []
        for t in entries:
            top = {a.token: a.logprob for a in t.top}
            top.setdefault(t.token, t.logprob)  # the sampled token is always there
            tops.append(top)
        offsets = []
        for t in entries:
            offsets.append(offset)
            offset += len(t.token)
        lp = CompletionLogprobs.model_construct(
            tokens=[t.token for t in entries],
            token_logprobs=[t.logprob for t in entries],
            top_logprobs=tops,
            text_offset=offsets,
        )
        want = CompletionChunkChoice.model_construct(
            index=0, text=text, logprobs=lp, finish_reason=None
        )
        assert got == reference(j, [want])
    assert offset == 5  # "hé", " x", "\ufffd": characters, not bytes
