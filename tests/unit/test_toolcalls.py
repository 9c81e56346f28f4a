"""Constrained text → one tool call, Hermes output → calls, tool history for templates."""

from __future__ import annotations

import json
import re

import pytest

from medserve.engines.base import Constraint, GenerationChunk, Message, Tool, ToolCall
from medserve.engines.toolcalls import (
    HermesCalls,
    ToolCallStream,
    auto_format,
    call_id,
    template_messages,
    template_tools,
)


def run(
    feeder: ToolCallStream | HermesCalls, pieces: list[str], finish: str = "stop"
) -> list[GenerationChunk]:
    out = [feeder.feed(GenerationChunk(p)) for p in pieces]
    out.append(feeder.feed(GenerationChunk("", finish_reason=finish)))  # type: ignore[arg-type]
    return out


def joined(out: list[GenerationChunk]) -> dict[int, dict[str, str]]:
    calls: dict[int, dict[str, str]] = {}
    for chunk in out:
        for d in chunk.tool_calls:
            call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += d.id or ""
            call["name"] += d.name or ""
            call["arguments"] += d.arguments
    return calls


ENVELOPE_CASES = [
    # (pieces of generated text, name, arguments text)
    (['{"name": "f", "arguments": {"a": 1}}'], "f", '{"a": 1}'),
    (
        ['{"na', 'me": "g",', ' "arguments": ', '{"s": "}\\"{"', ', "t": [1, {}]}', "} "],
        "g",
        '{"s": "}\\"{", "t": [1, {}]}',
    ),
    (['{"name":"h","arguments":[1,2]}'], "h", "[1,2]"),
    (['{"name": "k", "arguments": 42}'], "k", "42"),
]


@pytest.mark.parametrize(("pieces", "name", "arguments"), ENVELOPE_CASES)
def test_required_envelope_becomes_one_call(pieces: list[str], name: str, arguments: str) -> None:
    out = run(ToolCallStream(Constraint(kind="tool", schema="{}")), pieces)
    (call,) = joined(out).values()
    assert re.fullmatch(r"call_[A-Za-z0-9]{24}", call["id"])
    assert call["name"] == name and call["arguments"] == arguments
    assert out[-1].finish_reason == "tool_calls"
    assert all(c.text == "" for c in out)


def test_named_call_streams_arguments_as_they_come() -> None:
    out = run(ToolCallStream(Constraint(kind="tool", schema="{}", name="f")), ['{"a"', ": 1}"])
    assert out[0].tool_calls[0].name == "f" and out[0].tool_calls[0].arguments == '{"a"'
    assert out[1].tool_calls[0].id is None and out[1].tool_calls[0].arguments == ": 1}"
    assert joined(out)[0]["arguments"] == '{"a": 1}' and out[-1].finish_reason == "tool_calls"


CUT_CASES = [
    # (id, tool name of a named choice or None for required, pieces, calls as (name, args))
    ("required, cut in the envelope", None, ['{"name": "f", "argu'], {}),
    ("required, cut inside the name", None, ['{"name": "lo'], {}),
    ("required, nothing came", None, [], {}),
    ("required, cut in the arguments", None, ['{"name": "f", "arguments": {"a'], {"f": '{"a'}),
    ("named, nothing came", "g", [], {"g": ""}),
    ("named, cut in the arguments", "g", ['{"a": '], {"g": '{"a": '}),
]


@pytest.mark.parametrize(
    ("name", "pieces", "calls"), [c[1:] for c in CUT_CASES], ids=[c[0] for c in CUT_CASES]
)
def test_a_cut_call_says_length_and_never_sends_a_call_without_a_name(
    name: str | None, pieces: list[str], calls: dict[str, str]
) -> None:
    out = run(ToolCallStream(Constraint(kind="tool", schema="{}", name=name)), pieces, "length")
    assert out[-1].finish_reason == "length"
    assert {c["name"]: c["arguments"] for c in joined(out).values()} == calls


HERMES_CASES = [
    # (pieces, content text, calls (name, arguments), finish)
    (["Hello", " there"], "Hello there", [], "stop"),
    (
        ["Sure. <tool", '_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'],
        "Sure. ",
        [("f", '{"x": 1}')],
        "tool_calls",
    ),
    (
        [
            '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>',
            '{"name": "b", "arguments": {"y": "z"}}</tool_call>',
        ],
        "",
        [("a", "{}"), ("b", '{"y": "z"}')],
        "tool_calls",
    ),
    (["x <tool_call>{not json</tool_call>"], "x <tool_call>{not json</tool_call>", [], "stop"),
    (["a <tool"], "a <tool", [], "stop"),
]


@pytest.mark.parametrize(("pieces", "content", "calls", "finish"), HERMES_CASES)
def test_hermes_calls(
    pieces: list[str], content: str, calls: list[tuple[str, str]], finish: str
) -> None:
    out = run(HermesCalls(), pieces)
    assert "".join(c.text for c in out) == content
    got = joined(out)
    assert [(c["name"], c["arguments"]) for c in got.values()] == calls
    assert out[-1].finish_reason == finish


def test_auto_format_needs_tools_and_hermes_markup() -> None:
    assert auto_format("{% for m in messages %}{{ m.content }}{% endfor %}") is None
    assert auto_format("{% if tools %}<tool_call>{% endif %}") == "hermes"
    assert auto_format("{% if tools %}[TOOL_CALLS]{% endif %}") is None


def test_call_ids_differ() -> None:
    assert len({call_id() for _ in range(50)}) == 50


def test_history_without_template_support_is_text() -> None:
    messages = (
        Message(
            "assistant",
            "ok",
            tool_calls=(ToolCall("c1", "f", '{"a":1}'), ToolCall("c2", "g", "bad")),
        ),
        Message("tool", "result", tool_call_id="c1"),
    )
    wire = template_messages(messages, lambda s: f"<{s}>", tools_aware=False)
    assert wire[0] == {
        "role": "assistant",
        "content": '<ok\n{"name": "f", "arguments": {"a": 1}}\n{"name": "g", "arguments": "bad"}>',
    }
    assert wire[1] == {"role": "tool", "content": "<result>"}


def test_history_and_tools_with_template_support_marks_strings() -> None:
    messages = (Message("assistant", "", tool_calls=(ToolCall("c1", "f", '{"a":1}'),)),)
    wire = template_messages(messages, lambda s: f"<{s}>", tools_aware=True)
    assert wire[0]["tool_calls"] == [
        {"id": "<c1>", "type": "function", "function": {"name": "<f>", "arguments": '<{"a":1}>'}}
    ]
    params = {"type": "object", "properties": {"dose": {"type": "string", "enum": ["5 mg"]}}}
    (tool,) = template_tools((Tool("f", json.dumps(params), "desc"),), lambda s: f"<{s}>")
    assert tool == {
        "type": "function",
        "function": {
            "name": "<f>",
            "description": "<desc>",
            "parameters": {
                "type": "object",
                "properties": {"dose": {"type": "string", "enum": ["<5 mg>"]}},
            },
        },
    }
