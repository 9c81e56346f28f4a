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

from medserve.api.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    CompletionChunk,
    CompletionChunkChoice,
    Usage,
)
from medserve.api.serving import DeltaFields, Job, Kind, _Events
from medserve.engines.base import GenerationChunk, GenerationRequest, Message, Sampling
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
    {"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]},
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
    events = _Events(j)
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
        assert _Events(j).piece(text, finish) == reference(j, [choice(j, text, finish)])


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_a_lone_surrogate_raises_as_the_models_do(kind: Kind) -> None:
    j = job(kind, False)
    with pytest.raises(ValueError, match="surrogate"):  # pydantic's error is a ValueError
        reference(j, [choice(j, "a\ud800", None)])
    with pytest.raises(UnicodeEncodeError):
        _Events(j).piece("a\ud800")


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
