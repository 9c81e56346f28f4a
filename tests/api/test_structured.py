"""Structured answers on the wire (issue 18): response_format, tools, tool_choice, tool
messages and logprobs parsed into the engine seam's types, and the answers' OpenAI shapes,
streamed and not, read back with the official client's own models; every refusal a 400
naming its parameter and never echoing client text. Table-driven on the fake engine,
which honours a constraint's kind with a scripted answer (medserve.engines.fake).
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openai.types import Completion as OpenAICompletion
from openai.types.chat import ChatCompletion as OpenAIChatCompletion
from openai.types.chat import ChatCompletionChunk as OpenAIChatCompletionChunk

from medserve.api import structured
from medserve.audit.keys import ChainKeys, load_or_create_secret
from medserve.audit.record import chat_input, chat_message
from medserve.engines.base import (
    Constraint,
    GenerationChunk,
    GenerationRequest,
    Message,
    NamedTool,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolCallDelta,
)
from medserve.engines.fake import FakeEngine
from medserve.errors import InvalidRequestError
from tests.api.test_metrics import scrape
from tests.conftest import SECRET
from tests.sse import events as sse

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MODEL = "fake-echo"
USER = [{"role": "user", "content": SECRET}]
# A schema whose property names are patient text: never in a response or an audit record.
SCHEMA = {
    "type": "object",
    "properties": {SECRET: {"type": "string"}, "n": {"type": "integer", "minimum": 0}},
    "required": [SECRET],
}
CANONICAL = json.dumps(SCHEMA, separators=(",", ":"), ensure_ascii=False)
PARAMS = {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER, **fields}


def tool(name: str, parameters: Any = None, **more: Any) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name, **more}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


def named(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}


def canonical(value: Any) -> str:
    """The schema's text on the seam: compact, the client's key order kept."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def call(call_id: str, name: str = "lookup", arguments: str = "{}") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def post(client: TestClient, path: str, body: dict[str, Any]) -> Any:
    return client.post(path, json=body)


def last_request(engine: FakeEngine) -> GenerationRequest:
    return engine.requests[-1]


def assert_clean(r: Any) -> None:
    assert SECRET not in r.text
    for name, value in r.headers.items():
        assert SECRET not in f"{name}{value}"


# --- What each request becomes: the seam's types, exactly -------------------------------

REQUIRED_SCHEMA = {
    "anyOf": [
        {
            "type": "object",
            "properties": {"name": {"const": "lookup"}, "arguments": PARAMS},
            "required": ["name", "arguments"],
        },
        {
            "type": "object",
            "properties": {
                "name": {"const": "note"},
                "arguments": {"type": "object", "properties": {}},
            },
            "required": ["name", "arguments"],
        },
    ]
}
TWO_TOOLS = [tool("lookup", PARAMS, description="Find a code.", strict=True), tool("note")]
PARSED_TOOLS = (
    Tool("lookup", canonical(PARAMS), "Find a code.", True),
    Tool("note", canonical({"type": "object", "properties": {}})),
)
# (id, body fields, constraint, tools, tool_choice, logprobs)
PARSES: list[tuple[str, dict[str, Any], Constraint | None, tuple[Tool, ...], Any, int | None]] = [
    ("plain", {}, None, (), None, None),
    ("text format", {"response_format": {"type": "text"}}, None, (), None, None),
    (
        "json_object",
        {"response_format": {"type": "json_object"}},
        Constraint("json_object"),
        (),
        None,
        None,
    ),
    (
        "json_schema",
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "extract_1", "schema": SCHEMA, "strict": True},
            }
        },
        Constraint("json_schema", CANONICAL, sha(CANONICAL), "extract_1", True),
        (),
        None,
        None,
    ),
    ("tools, auto by default", {"tools": TWO_TOOLS}, None, PARSED_TOOLS, "auto", None),
    ("tools, none", {"tools": TWO_TOOLS, "tool_choice": "none"}, None, PARSED_TOOLS, "none", None),
    (
        "named tool",
        {"tools": TWO_TOOLS, "tool_choice": named("lookup"), "parallel_tool_calls": False},
        Constraint("tool", canonical(PARAMS), sha(canonical(PARAMS)), "lookup", True),
        PARSED_TOOLS,
        NamedTool("lookup"),
        None,
    ),
    (
        "required",
        {"tools": TWO_TOOLS, "tool_choice": "required"},
        Constraint("tool", canonical(REQUIRED_SCHEMA), sha(canonical(REQUIRED_SCHEMA)), None),
        PARSED_TOOLS,
        "required",
        None,
    ),
    ("logprobs", {"logprobs": True}, None, (), None, 0),
    ("top_logprobs 0", {"logprobs": True, "top_logprobs": 0}, None, (), None, 0),
    ("top_logprobs 20", {"logprobs": True, "top_logprobs": 20}, None, (), None, 20),
    ("logprobs false", {"logprobs": False}, None, (), None, None),
]


@pytest.mark.parametrize(
    ("fields", "constraint", "tools", "choice", "logprobs"),
    [case[1:] for case in PARSES],
    ids=[case[0] for case in PARSES],
)
def test_a_request_becomes_the_seams_types(
    client: TestClient,
    fake_engine: FakeEngine,
    fields: dict[str, Any],
    constraint: Constraint | None,
    tools: tuple[Tool, ...],
    choice: Any,
    logprobs: int | None,
) -> None:
    r = post(client, CHAT, chat(**fields))
    assert r.status_code == 200, r.text
    got = last_request(fake_engine)
    assert (got.constraint, got.tools, got.tool_choice, got.logprobs) == (
        constraint,
        tools,
        choice,
        logprobs,
    )


def test_the_schemas_key_order_is_kept_as_it_is_the_generation_order(
    client: TestClient, fake_engine: FakeEngine
) -> None:
    """Sorted keys would make the model write `answer` before its `reasoning`, and a
    required call's arguments before the function's name."""
    schema = {"type": "object", "properties": {"reasoning": {}, "answer": {}}}
    rf = {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}
    assert post(client, CHAT, chat(response_format=rf)).status_code == 200
    text = last_request(fake_engine).constraint.schema  # type: ignore[union-attr]
    assert text == '{"type":"object","properties":{"reasoning":{},"answer":{}}}'
    assert post(client, CHAT, chat(tools=TWO_TOOLS, tool_choice="required")).status_code == 200
    required = last_request(fake_engine).constraint.schema  # type: ignore[union-attr]
    assert required is not None
    first = json.loads(required)["anyOf"][0]["properties"]
    assert list(first) == ["name", "arguments"]


def test_tool_history_reaches_the_engine_as_typed_messages(
    client: TestClient, fake_engine: FakeEngine
) -> None:
    messages = [
        {"role": "user", "content": "code?"},
        {"role": "assistant", "content": None, "tool_calls": [call("c1", arguments='{"q":1}')]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "I10"}]},
        {"role": "assistant", "content": "", "tool_calls": [call("c2"), call("c3", "note")]},
        {"role": "tool", "tool_call_id": "c3", "content": "ok"},
        {"role": "tool", "tool_call_id": "c1", "content": "again"},
    ]
    r = post(client, CHAT, chat(messages=messages, tools=TWO_TOOLS))
    assert r.status_code == 200, r.text
    assert last_request(fake_engine).messages == (
        Message("user", "code?"),
        Message("assistant", "", (ToolCall("c1", "lookup", '{"q":1}'),)),
        Message("tool", "I10", tool_call_id="c1"),
        Message("assistant", "", (ToolCall("c2", "lookup", "{}"), ToolCall("c3", "note", "{}"))),
        Message("tool", "ok", tool_call_id="c3"),
        Message("tool", "again", tool_call_id="c1"),
    )


# Chat's structured-answer fields on the legacy endpoint: refused by name, never ignored
# (an app would believe its answer constrained).
CHAT_ONLY = [
    ("response_format", {"type": "json_object"}),
    ("tools", TWO_TOOLS),
    ("tool_choice", "required"),
    ("top_logprobs", 2),
]


@pytest.mark.parametrize(("name", "value"), CHAT_ONLY, ids=[c[0] for c in CHAT_ONLY])
def test_chat_only_fields_are_refused_on_completions(
    client: TestClient, fake_engine: FakeEngine, name: str, value: Any
) -> None:
    r = post(client, COMPLETIONS, {"model": MODEL, "prompt": SECRET, name: value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"]) == (name, "unsupported_parameter")
    assert_clean(r)
    assert fake_engine.requests == []


def test_completion_logprobs_reach_the_engine(client: TestClient, fake_engine: FakeEngine) -> None:
    for n in (None, 0, 5):
        body: dict[str, Any] = {"model": MODEL, "prompt": "a b"}
        if n is not None:
            body["logprobs"] = n
        assert post(client, COMPLETIONS, body).status_code == 200
        assert last_request(fake_engine).logprobs == n


# --- Every refusal: a 400 naming the parameter, never a value ---------------------------

BAD_NAMES = ["bad name", "x" * 65, "", "naïve", SECRET + "!"]
UNSUPPORTED = "unsupported_parameter"
# (id, body fields, param, code)
STOPPED: list[tuple[str, dict[str, Any]]] = [
    ("json_object", {"response_format": {"type": "json_object"}}),
    (
        "json_schema",
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": PARAMS},
            }
        },
    ),
    ("required", {"tools": TWO_TOOLS, "tool_choice": "required"}),
    ("a named tool", {"tools": TWO_TOOLS, "tool_choice": named("lookup")}),
]
REFUSALS: list[tuple[str, dict[str, Any], str, str | None]] = [
    *[
        (
            f"json_schema name {i}",
            {"response_format": {"type": "json_schema", "json_schema": {"name": n, "schema": {}}}},
            "response_format.json_schema.name",
            None,
        )
        for i, n in enumerate(BAD_NAMES)
    ],
    (
        "json_schema without schema",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "n"}}},
        "response_format.json_schema.schema",
        None,
    ),
    (
        "json_schema schema not an object",
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "n", "schema": [SECRET]},
            }
        },
        "response_format.json_schema.schema",
        None,
    ),
    (
        "json_schema strict not a boolean",
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "n", "schema": {}, "strict": "yes"},
            }
        },
        "response_format.json_schema.strict",
        None,
    ),
    (
        "json_schema missing",
        {"response_format": {"type": "json_schema"}},
        "response_format.json_schema",
        None,
    ),
    ("format type", {"response_format": {"type": SECRET}}, "response_format.type", None),
    ("tool type", {"tools": [{"type": "retrieval"}]}, "tools[0].type", None),
    *[
        (f"tool name {i}", {"tools": [tool(n)]}, "tools[0].function.name", None)
        for i, n in enumerate(BAD_NAMES)
    ],
    ("tool names repeat", {"tools": [tool("f"), tool("f")]}, "tools[1].function.name", None),
    (
        "tool parameters not an object schema",
        {"tools": [tool("f", {"type": "string", "description": SECRET})]},
        "tools[0].function.parameters",
        None,
    ),
    (
        "tool parameters a list",
        {"tools": [tool("f", [SECRET])]},
        "tools[0].function.parameters",
        None,
    ),
    ("tool_choice unknown", {"tools": [tool("f")], "tool_choice": named("g")}, "tool_choice", None),
    ("tool_choice word", {"tools": [tool("f")], "tool_choice": SECRET}, "tool_choice", None),
    ("tool_choice without tools", {"tool_choice": "none"}, "tool_choice", None),
    ("tool_choice named without tools", {"tool_choice": named("f")}, "tool_choice", None),
    (
        "tool_choice type",
        {"tools": [tool("f")], "tool_choice": {"type": "x", "function": {"name": "f"}}},
        "tool_choice.type",
        None,
    ),
    (
        "forced call and a JSON format",
        {
            "tools": [tool("f")],
            "tool_choice": "required",
            "response_format": {"type": "json_object"},
        },
        "response_format",
        None,
    ),
    ("top_logprobs alone", {"top_logprobs": 3}, "top_logprobs", None),
    ("top_logprobs, logprobs false", {"logprobs": False, "top_logprobs": 3}, "top_logprobs", None),
    ("top_logprobs over 20", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", None),
    ("functions", {"functions": [{"name": "f"}]}, "functions", UNSUPPORTED),
    ("function_call", {"function_call": "auto"}, "function_call", UNSUPPORTED),
    (
        "tool message answering an unknown id",
        {
            "messages": [
                {"role": "assistant", "tool_calls": [call("c1")]},
                {"role": "tool", "tool_call_id": "c2", "content": SECRET},
            ]
        },
        "messages[1].tool_call_id",
        None,
    ),
    (
        "tool message before its call",
        {
            "messages": [
                {"role": "tool", "tool_call_id": "c1", "content": SECRET},
                {"role": "assistant", "tool_calls": [call("c1")]},
            ]
        },
        "messages[0].tool_call_id",
        None,
    ),
    (
        "tool message without an id",
        {"messages": [{"role": "tool", "content": SECRET}]},
        "messages[0].tool_call_id",
        None,
    ),
    (
        "tool_calls on a user message",
        {"messages": [{"role": "user", "content": SECRET, "tool_calls": [call("c1")]}]},
        "messages[0].tool_calls",
        None,
    ),
    (
        "tool_call_id on a user message",
        {"messages": [{"role": "user", "content": SECRET, "tool_call_id": "c1"}]},
        "messages[0].tool_call_id",
        None,
    ),
    (
        "assistant without content or calls",
        {"messages": [{"role": "assistant", "content": None}]},
        "messages[0].content",
        None,
    ),
    (
        "tool call type",
        {"messages": [{"role": "assistant", "tool_calls": [{**call("c1"), "type": SECRET}]}]},
        "messages[0].tool_calls[0].type",
        None,
    ),
    (
        "tool call name",
        {"messages": [{"role": "assistant", "tool_calls": [call("c1", SECRET + " x")]}]},
        "messages[0].tool_calls[0].function.name",
        None,
    ),
    (
        "tool call without arguments",
        {
            "messages": [
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f"}}],
                }
            ]
        },
        "messages[0].tool_calls[0].function.arguments",
        None,
    ),
    (
        "tool call id empty",
        {"messages": [{"role": "assistant", "tool_calls": [call("")]}]},
        "messages[0].tool_calls[0].id",
        None,
    ),
    # A stop sequence would cut the JSON and the answer would say "stop" (a call without
    # a name, under `required`).
    *[(f"stop with {what}", {**fields, "stop": ['"']}, "stop", None) for what, fields in STOPPED],
]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize(
    ("fields", "param", "code"), [c[1:] for c in REFUSALS], ids=[c[0] for c in REFUSALS]
)
def test_refusals_name_the_parameter_and_echo_nothing(
    client: TestClient,
    fake_engine: FakeEngine,
    fields: dict[str, Any],
    param: str,
    code: str | None,
    stream: bool,
) -> None:
    r = post(client, CHAT, chat(stream=stream, **fields))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert_clean(r)
    assert fake_engine.requests == []  # refused before any engine work


def _refuse_keyword(schema: Any, param: str) -> None:
    """Stands in for the grammar's check (helper E's): refuses one keyword by name."""
    if "patternProperties" in json.dumps(schema):
        raise InvalidRequestError(
            "The JSON schema keyword 'patternProperties' cannot be enforced.", param=param
        )


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "n",
                        "schema": {"patternProperties": {SECRET: {}}},
                    },
                }
            },
            "response_format",
        ),
        (
            {"tools": [tool("f"), tool("g", {"patternProperties": {SECRET: {}}})]},
            "tools[1].function.parameters",
        ),
    ],
    ids=["response_format", "tool parameters"],
)
def test_a_schema_the_grammar_cannot_enforce_is_a_400_from_its_check(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, fields: dict[str, Any], param: str
) -> None:
    monkeypatch.setattr(structured, "check_schema", _refuse_keyword)
    r = post(client, CHAT, chat(**fields))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert "patternProperties" in r.json()["error"]["message"]
    assert_clean(r)


# --- Answers: OpenAI's shapes, as the official client's models read them ----------------


def whole(client: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    r = post(client, CHAT, body)
    assert r.status_code == 200, r.text
    OpenAIChatCompletion.model_validate(r.json())  # the client reads it
    return dict(r.json())


def streamed(client: TestClient, body: dict[str, Any]) -> list[dict[str, Any]]:
    r = post(client, CHAT, {**body, "stream": True})
    assert r.status_code == 200, r.text
    events = sse(r.text)
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        OpenAIChatCompletionChunk.model_validate(event)
    return [e["choices"][0] for e in events[:-1] if e["choices"]]


def test_a_named_tool_call_whole(client: TestClient, fake_engine: FakeEngine) -> None:
    fake_engine.tool_arguments = '{"code": "I10 ü"}'
    body = whole(client, chat(tools=TWO_TOOLS, tool_choice=named("lookup")))
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None
    (tool_call,) = message["tool_calls"]
    assert set(tool_call) == {"id", "type", "function"}
    assert tool_call["type"] == "function"
    assert tool_call["id"].startswith("call_")
    assert tool_call["function"] == {"name": "lookup", "arguments": '{"code": "I10 ü"}'}
    assert choice["logprobs"] is None


def test_required_calls_the_first_tool_in_the_fake(client: TestClient) -> None:
    body = whole(client, chat(tools=TWO_TOOLS, tool_choice="required"))
    (tool_call,) = body["choices"][0]["message"]["tool_calls"]
    assert tool_call["function"]["name"] == "lookup"


def test_a_named_tool_call_streamed_in_openais_delta_shape(
    client: TestClient, fake_engine: FakeEngine
) -> None:
    fake_engine.tool_arguments = '{"code": "I10"}'  # 15 characters: 4 pieces
    choices = streamed(client, chat(tools=TWO_TOOLS, tool_choice=named("lookup")))
    deltas = [c["delta"] for c in choices]
    assert deltas[0] == {"role": "assistant", "content": ""}
    first = deltas[1]["tool_calls"]
    assert len(first) == 1 and first[0]["index"] == 0 and first[0]["type"] == "function"
    assert first[0]["id"].startswith("call_")
    assert first[0]["function"] == {"name": "lookup", "arguments": ""}
    pieces = [d["tool_calls"] for d in deltas[2:-1]]
    assert all(
        p == [{"index": 0, "function": {"arguments": p[0]["function"]["arguments"]}}]
        for p in pieces
    )
    assert "".join(p[0]["function"]["arguments"] for p in pieces) == '{"code": "I10"}'
    assert deltas[-1] == {}
    assert [c["finish_reason"] for c in choices][-2:] == [None, "tool_calls"]


def test_engine_tool_call_pieces_are_joined_per_index(
    client: TestClient, fake_engine: FakeEngine
) -> None:
    """Two calls, interleaved pieces and text (as a vLLM replica may send them)."""
    fake_engine.script(
        GenerationChunk("Let me check. "),
        GenerationChunk("", tool_calls=(ToolCallDelta(0, "call_a", "lookup", '{"co'),)),
        GenerationChunk("", tool_calls=(ToolCallDelta(1, "call_b", "note"),)),
        GenerationChunk("", tool_calls=(ToolCallDelta(0, arguments='de": 1}'),)),
        GenerationChunk("", tool_calls=(ToolCallDelta(1, arguments="{}"),)),
        GenerationChunk("", finish_reason="tool_calls", prompt_tokens=2, completion_tokens=5),
    )
    message = whole(client, chat(tools=TWO_TOOLS))["choices"][0]["message"]
    assert message["content"] == "Let me check. "
    assert message["tool_calls"] == [
        call("call_a", "lookup", '{"code": 1}'),
        call("call_b", "note", "{}"),
    ]


@pytest.mark.parametrize("kind", ["json_object", "json_schema"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_json_answer(
    client: TestClient, fake_engine: FakeEngine, kind: str, stream: bool
) -> None:
    fake_engine.json_reply = '{"answer": "ja", "n": 3}'
    rf: dict[str, Any] = {"type": kind}
    if kind == "json_schema":
        rf["json_schema"] = {"name": "a", "schema": {"type": "object"}}
    body = chat(response_format=rf)
    if stream:
        choices = streamed(client, body)
        text = "".join(c["delta"].get("content", "") for c in choices)
        finish = choices[-1]["finish_reason"]
    else:
        choice = whole(client, body)["choices"][0]
        text, finish = choice["message"]["content"], choice["finish_reason"]
        assert "tool_calls" not in choice["message"]
    assert json.loads(text) == {"answer": "ja", "n": 3}
    assert finish == "stop"


def test_a_json_answer_cut_by_the_budget_ends_with_length(
    client: TestClient, fake_engine: FakeEngine
) -> None:
    body = whole(client, chat(response_format={"type": "json_object"}, max_tokens=2))
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] == fake_engine.json_reply[:8]


def _alternatives(token: str, lp: float, n: int) -> list[dict[str, Any]]:
    """The fake's scripted alternatives (medserve.engines.fake)."""
    alts = [(token, lp) if j == 0 else (f"alt{j}", lp - j) for j in range(n)]
    return [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in alts]


@pytest.mark.parametrize("top", [0, 2])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_chat_logprobs(client: TestClient, top: int, stream: bool) -> None:
    body = chat(messages=[{"role": "user", "content": "ab cd"}], logprobs=True, top_logprobs=top)
    if stream:
        choices = streamed(client, body)
        entries = []
        for c in choices[1:-1]:  # after the role, before the finish
            assert c["logprobs"]["refusal"] is None
            assert len(c["logprobs"]["content"]) == 1  # one token per fake chunk
            entries += c["logprobs"]["content"]
        assert choices[0]["logprobs"] is None and choices[-1]["logprobs"] is None
        text = "".join(c["delta"].get("content", "") for c in choices)
    else:
        choice = whole(client, body)["choices"][0]
        assert choice["logprobs"]["refusal"] is None
        entries, text = choice["logprobs"]["content"], choice["message"]["content"]
    assert "".join(e["token"] for e in entries) == text
    for i, e in enumerate(entries):
        lp = -(i % 4) / 4
        assert e == {
            "token": e["token"],
            "logprob": lp,
            "bytes": list(e["token"].encode()),
            "top_logprobs": _alternatives(e["token"], lp, top),
        }


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_no_logprobs_unless_asked(client: TestClient, stream: bool) -> None:
    if stream:
        assert all(c["logprobs"] is None for c in streamed(client, chat()))
    else:
        assert whole(client, chat())["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_completion_logprobs(client: TestClient, stream: bool) -> None:
    body = {"model": MODEL, "prompt": "one two three", "logprobs": 2, "stream": stream}
    r = post(client, COMPLETIONS, body)
    assert r.status_code == 200, r.text
    if stream:
        events = [e for e in sse(r.text)[:-1] if e["choices"]]
        parts = [e["choices"][0]["logprobs"] for e in events if e["choices"][0]["logprobs"]]
        merged: dict[str, list[Any]] = {k: [] for k in parts[0]}
        for part in parts:
            for k, v in part.items():
                merged[k] += v
        text = "".join(e["choices"][0]["text"] for e in events)
    else:
        OpenAICompletion.model_validate(r.json())
        merged = r.json()["choices"][0]["logprobs"]
        text = r.json()["choices"][0]["text"]
    assert merged["tokens"] == ["one", " two", " three"] and text == "one two three"
    assert merged["token_logprobs"] == [0.0, -0.25, -0.5]
    assert merged["top_logprobs"] == [
        {"one": 0.0, "alt1": -1.0},
        {" two": -0.25, "alt1": -1.25},
        {" three": -0.5, "alt1": -1.5},
    ]
    assert merged["text_offset"] == [0, 3, 7]


def test_logprobs_of_an_impossible_token_are_a_finite_floor(
    client: TestClient, fake_engine: FakeEngine
) -> None:
    alt = TokenLogprob("z", b"z", -math.inf)
    fake_engine.script(GenerationChunk("a", logprobs=(TokenLogprob("a", b"a", math.nan, (alt,)),)))
    body = whole(client, chat(logprobs=True, top_logprobs=1))
    (entry,) = body["choices"][0]["logprobs"]["content"]
    assert entry["logprob"] == -9999.0 and entry["top_logprobs"][0]["logprob"] == -9999.0


# --- The audit record and the metrics -------------------------------------------------


def _records(db: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT body FROM records ORDER BY seq").fetchall()
    finally:
        conn.close()
    return [r for r in (json.loads(b) for (b,) in rows) if r["kind"] == "request"]


def _keys(audit_path: Path) -> ChainKeys:
    return ChainKeys.from_secret(load_or_create_secret(audit_path.with_name("audit.key")))


SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
# The digest of TWO_TOOLS' definitions, written out by hand: name, description (null when
# absent), parameters (the default object schema when absent), strict, in request order.
TWO_TOOLS_SHA = sha(
    '[{"name":"lookup","description":"Find a code.","parameters":'
    + canonical(PARAMS)
    + ',"strict":true},{"name":"note","description":null,"parameters":'
    '{"type":"object","properties":{}},"strict":false}]'
)
# (id, body fields, constraint, schema sha256, tools offered, their digest)
AUDITED: list[tuple[str, dict[str, Any], str | None, str | None, int | None, str | None]] = [
    ("plain", {}, None, None, None, None),
    ("json_object", {"response_format": {"type": "json_object"}}, "json_object", None, None, None),
    (
        "json_schema",
        {"response_format": SCHEMA_FORMAT},
        "json_schema",
        sha(CANONICAL),
        None,
        None,
    ),
    ("auto", {"tools": TWO_TOOLS}, None, None, 2, TWO_TOOLS_SHA),
    (
        "named",
        {"tools": TWO_TOOLS, "tool_choice": named("lookup")},
        "tool",
        sha(canonical(PARAMS)),
        2,
        TWO_TOOLS_SHA,
    ),
]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize(
    ("fields", "constraint", "digest", "tools", "tools_digest"),
    [c[1:] for c in AUDITED],
    ids=[c[0] for c in AUDITED],
)
def test_the_record_holds_the_constraint_and_schema_digest_never_the_schema(
    client: TestClient,
    audit_path: Path,
    fields: dict[str, Any],
    constraint: str | None,
    digest: str | None,
    tools: int | None,
    tools_digest: str | None,
    stream: bool,
) -> None:
    r = post(client, CHAT, chat(stream=stream, **fields))
    assert r.status_code == 200, r.text
    (record,) = _records(audit_path)
    held = (record["constraint"], record["schema_sha256"], record["tools"], record["tools_sha256"])
    assert held == (constraint, digest, tools, tools_digest)
    for path in audit_path.parent.iterdir():  # the database, its WAL, the keys
        assert SECRET.encode() not in path.read_bytes()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_the_answers_tool_calls_are_part_of_the_audited_output(
    client: TestClient, fake_engine: FakeEngine, audit_path: Path, stream: bool
) -> None:
    r = post(client, CHAT, chat(tools=TWO_TOOLS, tool_choice=named("lookup"), stream=stream))
    assert r.status_code == 200, r.text
    if stream:
        first = next(
            e for e in sse(r.text)[:-1] if e["choices"] and "tool_calls" in e["choices"][0]["delta"]
        )
        call_id = first["choices"][0]["delta"]["tool_calls"][0]["id"]
    else:
        call_id = r.json()["choices"][0]["message"]["tool_calls"][0]["id"]
    (record,) = _records(audit_path)
    answered = call(call_id, "lookup", fake_engine.tool_arguments)
    audited = json.dumps(
        {"content": "", "tool_calls": [answered]}, sort_keys=True, ensure_ascii=False
    )
    assert record["completion_hmac"] == _keys(audit_path).text_hmac(audited.encode())
    # ... and a plain answer's audited output is its text, as in older records.
    r = post(client, CHAT, chat(messages=[{"role": "user", "content": "a b"}]))
    plain = _records(audit_path)[-1]
    assert plain["completion_hmac"] == _keys(audit_path).text_hmac(
        r.json()["choices"][0]["message"]["content"].encode()
    )


def test_the_prompt_hash_covers_tool_history_and_keeps_the_plain_form(
    client: TestClient, audit_path: Path
) -> None:
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [call("c1", arguments='{"a":1}')]},
        {"role": "tool", "tool_call_id": "c1", "content": "r"},
    ]
    assert post(client, CHAT, chat(messages=messages, tools=TWO_TOOLS)).status_code == 200
    (record,) = _records(audit_path)
    expected = chat_input(
        [
            chat_message("user", "q"),
            chat_message("assistant", "", [("c1", "lookup", '{"a":1}')]),
            chat_message("tool", "r", tool_call_id="c1"),
        ]
    )
    assert record["prompt_hmac"] == _keys(audit_path).text_hmac(expected)
    # the form of messages without tool fields is the one older records hashed
    assert chat_input([chat_message("user", "q")]) == chat_input([("user", "q")])
    assert chat_input([("user", "q")]) == b'[{"role":"user","content":"q"}]'


def test_constrained_requests_are_counted_by_kind(client: TestClient) -> None:
    def count(kind: str) -> float:
        samples = scrape(client)
        return samples.get(("medserve_constrained_requests_total", key(kind)), -1.0)

    def key(kind: str) -> tuple[tuple[str, str], ...]:
        return tuple(sorted({"model": MODEL, "kind": kind}.items()))

    assert [count(k) for k in ("json_object", "json_schema", "tool")] == [0.0, 0.0, 0.0]
    post(client, CHAT, chat(response_format={"type": "json_object"}))
    post(client, CHAT, chat(response_format={"type": "json_object"}, stream=True))
    post(client, CHAT, chat(tools=TWO_TOOLS, tool_choice="required"))
    post(client, CHAT, chat(tools=TWO_TOOLS))  # auto: not constrained
    post(client, CHAT, chat(response_format={"type": "json_schema"}))  # refused: not parsed
    assert [count(k) for k in ("json_object", "json_schema", "tool")] == [2.0, 0.0, 1.0]
