"""Structured answers through the vllm engine, against the fake OpenAI upstream: a
request's constraint, tools, tool_choice, logprobs and tool-call history reach vLLM in
OpenAI's names exactly as the upstream records them, and vLLM's tool-call deltas and
logprobs come back as GenerationChunk fields (the web layer shapes them for the client)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from medserve.engines.base import (
    Constraint,
    GenerationChunk,
    GenerationRequest,
    Message,
    NamedTool,
    Sampling,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolCallDelta,
)
from medserve.engines.supervisor import LaunchSpec, vllm_argv
from medserve.engines.upstream import prompt_token_bound
from medserve.engines.vllm import VllmEngine, VllmSpec
from medserve.engines.vllm_wire import choice_chunk, token_logprobs, tool_call_deltas
from medserve.errors import EngineError, InvalidRequestError
from tests.conftest import flat_spec
from tests.fakeupstream import FakeUpstream, Knobs, running_upstream

pytestmark = pytest.mark.anyio

SCHEMA = {
    "type": "object",
    "properties": {
        "code": {"enum": ["J45", "R06.2"]},
        "dose": {"type": "number", "minimum": 0, "maximum": 10},
    },
    "required": ["code"],
}
SCHEMA_TEXT = json.dumps(SCHEMA, sort_keys=True, separators=(",", ":"))
PARAMS = {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}
PARAMS_TEXT = json.dumps(PARAMS, sort_keys=True, separators=(",", ":"))
LOOKUP = Tool("lookup_icd", PARAMS_TEXT, description="Find an ICD-10 code", strict=True)
NOTE = Tool("add_note", '{"properties":{},"type":"object"}')
WIRE_LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup_icd",
        "description": "Find an ICD-10 code",
        "parameters": PARAMS,
        "strict": True,
    },
}
WIRE_NOTE = {
    "type": "function",
    "function": {"name": "add_note", "parameters": {"type": "object", "properties": {}}},
}
STRUCTURED = ("response_format", "tools", "tool_choice", "logprobs", "top_logprobs")


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
        read_timeout_s=10.0,
        first_event_timeout_s=10.0,
    )
    e = VllmEngine(flat_spec(id="med", engine="fake"), spec)
    await e.start()
    yield e
    await e.close()


def req(chat: bool = True, max_tokens: int | None = 8, **fields: Any) -> GenerationRequest:
    s = Sampling(
        max_tokens=max_tokens,
        temperature=0.0,
        top_p=1.0,
        top_k=0,
        min_p=0.0,
        repeat_penalty=1.0,
        frequency_penalty=0.0,
        presence_penalty=0.0,
        seed=0,
    )
    if chat:
        return GenerationRequest("r1", "med", s, messages=(Message("user", "a b c"),), **fields)
    return GenerationRequest("r1", "med", s, prompt="a b c d", **fields)


async def drain(e: VllmEngine, r: GenerationRequest) -> list[GenerationChunk]:
    return [c async for c in e.generate(r)]


def schema_constraint(strict: bool = True, name: str | None = "diagnosis") -> Constraint:
    digest = hashlib.sha256(SCHEMA_TEXT.encode()).hexdigest()
    return Constraint("json_schema", SCHEMA_TEXT, digest, name, strict)


# --- the request: fields passed through exactly ----------------------------------------

REQUEST_CASES: list[tuple[str, bool, dict[str, Any], dict[str, Any]]] = [
    # (id, chat, GenerationRequest fields, the structured fields the upstream must get)
    ("plain", True, {}, {}),
    (
        "json-object",
        True,
        {"constraint": Constraint("json_object")},
        {"response_format": {"type": "json_object"}},
    ),
    (
        "json-schema",
        True,
        {"constraint": schema_constraint()},
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "diagnosis", "schema": SCHEMA, "strict": True},
            }
        },
    ),
    (
        "json-schema-unnamed-not-strict",
        True,
        {"constraint": schema_constraint(strict=False, name=None)},
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "response", "schema": SCHEMA, "strict": False},
            }
        },
    ),
    (
        "json-schema-completions",
        False,
        {"constraint": schema_constraint()},
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "diagnosis", "schema": SCHEMA, "strict": True},
            }
        },
    ),
    (
        # vLLM constrains a named tool_choice itself: no response_format beside it.
        "named-tool",
        True,
        {
            "tools": (LOOKUP, NOTE),
            "tool_choice": NamedTool("lookup_icd"),
            "constraint": Constraint("tool", PARAMS_TEXT, "x", "lookup_icd"),
        },
        {
            "tools": [WIRE_LOOKUP, WIRE_NOTE],
            "tool_choice": {"type": "function", "function": {"name": "lookup_icd"}},
        },
    ),
    (
        "required-tool",
        True,
        {
            "tools": (LOOKUP,),
            "tool_choice": "required",
            "constraint": Constraint("tool", "{}", "x"),
        },
        {"tools": [WIRE_LOOKUP], "tool_choice": "required"},
    ),
    (
        "auto-tool",
        True,
        {"tools": (LOOKUP,), "tool_choice": "auto"},
        {"tools": [WIRE_LOOKUP], "tool_choice": "auto"},
    ),
    (
        "no-tool",
        True,
        {"tools": (NOTE,), "tool_choice": "none"},
        {"tools": [WIRE_NOTE], "tool_choice": "none"},
    ),
    ("tools-default-choice", True, {"tools": (NOTE,)}, {"tools": [WIRE_NOTE]}),
    ("chat-logprobs", True, {"logprobs": 3}, {"logprobs": True, "top_logprobs": 3}),
    ("chat-logprobs-no-top", True, {"logprobs": 0}, {"logprobs": True, "top_logprobs": 0}),
    ("completion-logprobs", False, {"logprobs": 2}, {"logprobs": 2}),
    ("completion-logprobs-0", False, {"logprobs": 0}, {"logprobs": 0}),
]


@pytest.mark.parametrize(
    ("chat", "fields", "expected"),
    [case[1:] for case in REQUEST_CASES],
    ids=[case[0] for case in REQUEST_CASES],
)
async def test_structured_fields_reach_the_upstream_exactly(
    engine: VllmEngine,
    upstream: FakeUpstream,
    chat: bool,
    fields: dict[str, Any],
    expected: dict[str, Any],
) -> None:
    upstream.knobs = Knobs(text="{}")
    chunks = await drain(engine, req(chat, **fields))
    assert chunks[-1].finish_reason == "stop"
    body = upstream.seen[-1].body
    assert {k: body[k] for k in STRUCTURED if k in body} == expected
    assert upstream.seen[-1].path == ("/v1/chat/completions" if chat else "/v1/completions")


async def test_tool_call_history_goes_upstream_in_openais_shape(
    engine: VllmEngine, upstream: FakeUpstream
) -> None:
    calls = (
        ToolCall("call_1", "lookup_icd", '{"code": "J45"}'),
        ToolCall("call_2", "add_note", "{}"),
    )
    messages = (
        Message("user", "Code this: wheezing"),
        Message("assistant", "", tool_calls=calls),
        Message("tool", '{"label": "Asthma"}', tool_call_id="call_1"),
        Message("tool", "ok", tool_call_id="call_2"),
        Message("assistant", "Noted", tool_calls=calls[:1]),
    )
    request = replace(req(), messages=messages, tools=(LOOKUP, NOTE))
    await drain(engine, request)
    wire_calls = [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "lookup_icd", "arguments": '{"code": "J45"}'},
        },
        {"id": "call_2", "type": "function", "function": {"name": "add_note", "arguments": "{}"}},
    ]
    assert upstream.seen[-1].body["messages"] == [
        {"role": "user", "content": "Code this: wheezing"},
        {"role": "assistant", "content": None, "tool_calls": wire_calls},
        {"role": "tool", "content": '{"label": "Asthma"}', "tool_call_id": "call_1"},
        {"role": "tool", "content": "ok", "tool_call_id": "call_2"},
        {"role": "assistant", "content": "Noted", "tool_calls": wire_calls[:1]},
    ]
    # The budget check counts the prompt as vLLM renders it: the tools included.
    asked = upstream.tokenized[-1]
    assert asked["tools"] == [WIRE_LOOKUP, WIRE_NOTE]
    assert asked["messages"] == upstream.seen[-1].body["messages"]


def test_the_token_bound_counts_tools_and_tool_calls() -> None:
    plain = {"messages": [{"role": "user", "content": "x"}]}
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": [1, 2]}'}}
    history = {
        "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "r", "tool_call_id": "c"},
        ]
    }
    with_tools = {**history, "tools": [WIRE_LOOKUP]}
    base = prompt_token_bound(plain, 0)
    assert prompt_token_bound(history, 0) >= base + len(json.dumps(call)) + len("r") + len("c")
    assert prompt_token_bound(with_tools, 0) >= prompt_token_bound(history, 0) + len(
        json.dumps(WIRE_LOOKUP)
    )


# --- the answer: tool calls and logprobs come back -------------------------------------

FIRST = {
    "index": 0,
    "id": "chatcmpl-tool-1",
    "type": "function",
    "function": {"name": "lookup_icd", "arguments": ""},
}
ARGS = [
    {"index": 0, "function": {"arguments": '{"code": '}},
    {"index": 0, "function": {"arguments": '"J45"}'}},
]
SECOND = {
    "index": 1,
    "id": "chatcmpl-tool-2",
    "type": "function",
    "function": {"name": "add_note", "arguments": "{}"},
}
CALL_DELTAS = [
    ToolCallDelta(0, "chatcmpl-tool-1", "lookup_icd", ""),
    ToolCallDelta(0, None, None, '{"code": '),
    ToolCallDelta(0, None, None, '"J45"}'),
]


@pytest.mark.parametrize(
    ("knobs", "text", "calls", "finish"),
    [
        # vLLM ends a named tool_choice's call with "stop": the engine says "tool_calls".
        (Knobs(text="", tool_calls=[FIRST, *ARGS], finish="stop"), "", CALL_DELTAS, "tool_calls"),
        (Knobs(text="", tool_calls=[FIRST, *ARGS]), "", CALL_DELTAS, "tool_calls"),
        (
            Knobs(text="Let me check", tool_calls=[FIRST, *ARGS, SECOND]),
            "Let me check",
            [*CALL_DELTAS, ToolCallDelta(1, "chatcmpl-tool-2", "add_note", "{}")],
            "tool_calls",
        ),
        # Cut by the budget inside the arguments: "length" stays.
        (
            Knobs(text="", tool_calls=[FIRST, ARGS[0]], finish="length"),
            "",
            CALL_DELTAS[:2],
            "length",
        ),
    ],
    ids=["named-stop", "auto", "text-then-two-calls", "length"],
)
async def test_tool_call_deltas_come_back_as_chunk_fields(
    engine: VllmEngine,
    upstream: FakeUpstream,
    knobs: Knobs,
    text: str,
    calls: list[ToolCallDelta],
    finish: str,
) -> None:
    upstream.knobs = knobs
    request = req(max_tokens=64, tools=(LOOKUP, NOTE), tool_choice="auto")
    *body, last = await drain(engine, request)
    assert "".join(c.text for c in body) == text
    assert [d for c in body for d in c.tool_calls] == calls
    assert all(c.extra is None for c in body)  # tool_calls are not an unknown delta field
    assert all(len(c.tool_calls) <= 1 and (not c.tool_calls or not c.text) for c in body)
    assert last.finish_reason == finish and last.tool_calls == ()
    assert last.completion_tokens == len(text.split()) + len(knobs.tool_calls or [])


def expected_logprobs(words: list[str], top: int, chat: bool) -> list[TokenLogprob]:
    """What the fake sends for these words (tests.fakeupstream.logprobs_of), as the engine
    must hand it on: most likely alternative first; completions' alternatives hold the
    sampled token even for 0 (vLLM's legacy dict)."""
    out = []
    for i, word in enumerate(words):
        piece = word if i == 0 else " " + word
        value = -(i + 1) / 4
        ranked = [(piece, value)] + [(f"alt{j}", value - j) for j in range(1, top)]
        kept = ranked[: top if chat else max(top, 1)]
        alternatives = tuple(TokenLogprob(t, t.encode(), v) for t, v in kept)
        out.append(TokenLogprob(piece, piece.encode(), value, alternatives))
    return out


TEXT = "Asthma ünd wheezing 🙂 at night"


@pytest.mark.parametrize("top", [0, 1, 3])
@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
async def test_logprobs_come_back_one_per_token(
    engine: VllmEngine, upstream: FakeUpstream, chat: bool, top: int
) -> None:
    upstream.knobs = Knobs(text=TEXT, split=True)  # events cut inside UTF-8 characters
    *body, last = await drain(engine, req(chat, max_tokens=64, logprobs=top))
    assert all(len(c.logprobs) == 1 and c.logprobs[0].token == c.text for c in body)
    assert [c.logprobs[0] for c in body] == expected_logprobs(TEXT.split(), top, chat)
    assert "".join(c.text for c in body) == TEXT and last.logprobs == ()


async def test_no_logprobs_unless_asked(engine: VllmEngine, upstream: FakeUpstream) -> None:
    upstream.knobs = Knobs(text="a b")
    chunks = await drain(engine, req())
    assert all(c.logprobs == () for c in chunks)
    assert "logprobs" not in upstream.seen[-1].body


# --- refusals and broken answers -------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [{"tool_choice": "auto"}, {}],
    ids=["auto", "default-with-tools"],
)
async def test_tool_choice_without_a_parser_is_a_400_naming_tool_choice(
    engine: VllmEngine, upstream: FakeUpstream, fields: dict[str, Any]
) -> None:
    upstream.knobs = Knobs(auto_tools=False)
    with pytest.raises(InvalidRequestError) as info:
        await drain(engine, req(tools=(LOOKUP,), **fields))
    assert info.value.param == "tool_choice"
    assert 'tool_choice "auto"' in info.value.message
    for leak in (upstream.url, "127.0.0.1", "--enable-auto-tool-choice", "a b c"):
        assert leak not in info.value.message
    # The same server serves a named choice (it has a parser for those here).
    await drain(engine, req(tools=(LOOKUP,), tool_choice=NamedTool("lookup_icd")))


@pytest.mark.parametrize(
    "bad",
    [
        {"index": "0", "function": {"name": "f"}},
        {"index": -1, "function": {"name": "f"}},
        {"index": 0, "function": "f"},
        {"index": 0, "id": 7},
        "a call",
    ],
    ids=["index-text", "index-negative", "function-text", "id-number", "not-an-object"],
)
async def test_a_tool_call_of_another_shape_breaks_the_stream(
    engine: VllmEngine, upstream: FakeUpstream, bad: object
) -> None:
    upstream.knobs = Knobs(text="", tool_calls=[FIRST, bad])  # type: ignore[list-item]
    with pytest.raises(EngineError):
        await drain(engine, req())


@pytest.mark.parametrize(
    "raw",
    [
        [],
        {"content": "x"},
        {"content": [{"logprob": -1.0}]},
        {"content": [{"token": "a", "logprob": "-1"}]},
        {"content": [{"token": "a", "logprob": -1.0, "bytes": [256]}]},
        {"content": [{"token": "a", "logprob": -1.0, "top_logprobs": {"b": -2.0}}]},
        {"tokens": ["a"], "token_logprobs": [-1.0], "top_logprobs": [["b"]]},
        {"tokens": "a"},
    ],
)
def test_logprobs_of_another_shape_are_refused(raw: object) -> None:
    with pytest.raises(ValueError):
        token_logprobs(raw)


def test_null_logprobs_and_missing_bytes_read_as_vllm_means_them() -> None:
    legacy = {
        "tokens": ["a", "b"],
        "token_logprobs": [None, -0.5],
        "top_logprobs": [None, {"b": -0.5, "c": -0.1}],
    }
    assert token_logprobs(legacy) == (
        TokenLogprob("a", b"a", -9999.0),
        TokenLogprob(
            "b", b"b", -0.5, (TokenLogprob("c", b"c", -0.1), TokenLogprob("b", b"b", -0.5))
        ),
    )
    chat = {"content": [{"token": "é", "logprob": -1, "bytes": None, "top_logprobs": []}]}
    assert token_logprobs(chat) == (TokenLogprob("é", "é".encode(), -1.0),)
    # Only index: a delta that carries nothing is not a piece of a call.
    assert tool_call_deltas([{"index": 0}]) == ()
    assert choice_chunk({"index": 0, "delta": {"role": "assistant", "content": ""}}) is None


# --- the supervised server's tool-call parser ------------------------------------------


def test_a_tool_call_parser_starts_vllm_with_auto_tool_choice(tmp_path: Path) -> None:
    base = {"python": tmp_path / "python", "model": tmp_path / "weights"}
    without = vllm_argv(LaunchSpec(**base), "m", 8000)
    assert "--tool-call-parser" not in without and "--enable-auto-tool-choice" not in without
    argv = vllm_argv(
        LaunchSpec(**base, tool_call_parser="hermes", args=("--dtype", "half")), "m", 8000
    )
    at = argv.index("--tool-call-parser")
    assert argv[at + 1] == "hermes" and "--enable-auto-tool-choice" in argv
    assert argv[-2:] == ["--dtype", "half"]
    for flag in ("--tool-call-parser=hermes", "--enable-auto-tool-choice"):
        with pytest.raises(ValueError, match="tool_call_parser"):
            LaunchSpec(**base, args=(flag,))
