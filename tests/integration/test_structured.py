"""Structured answers on the real SmolLM2 engine: JSON schemas, tool calls, logprobs.

Answers are validated with jsonschema (the dev extra's oracle), independent of medserve's
grammar code.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import pytest

from medserve.engines.base import (
    Constraint,
    GenerationChunk,
    GenerationRequest,
    Message,
    NamedTool,
    Tool,
    ToolCall,
)
from medserve.engines.llamacpp import LlamaCppEngine
from medserve.errors import InvalidRequestError
from tests.conftest import flat_spec, smollm2_path
from tests.integration.common import collect, request

pytestmark = [pytest.mark.engine, pytest.mark.anyio]

LETTER = (
    Message(
        "user",
        "Discharge letter: 67-year-old woman admitted with community-acquired pneumonia "
        "and type 2 diabetes. Treated with amoxicillin. Extract the data as JSON.",
    ),
)
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "patient": {
            "type": "object",
            "properties": {
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                "sex": {"enum": ["female", "male", "unknown"]},
            },
            "required": ["age", "sex"],
        },
        "diagnoses": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "code": {"type": "string", "maxLength": 6},
                    "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                },
                "required": ["code", "confidence"],
            },
            "minItems": 1,
            "maxItems": 2,
        },
        "follow_up": {"type": ["string", "null"], "maxLength": 20},
    },
    "required": ["patient", "diagnoses"],
}
VITALS = Tool(
    name="record_vitals",
    parameters=json.dumps(
        {
            "type": "object",
            "properties": {
                "pulse": {"type": "integer", "minimum": 20, "maximum": 250},
                "unit": {"enum": ["bpm"]},
            },
            "required": ["pulse", "unit"],
        },
        sort_keys=True,
        separators=(",", ":"),
    ),
    description="Record the patient's pulse.",
)
ALLERGY = Tool(
    name="note_allergy",
    parameters=json.dumps(
        {
            "type": "object",
            "properties": {"substance": {"type": "string", "maxLength": 20}},
            "required": ["substance"],
        },
        sort_keys=True,
        separators=(",", ":"),
    ),
)
CALL_ID = re.compile(r"^call_[A-Za-z0-9]{24}$")


def canonical(schema: Any) -> str:
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))


def schema_constraint(schema: dict[str, Any]) -> Constraint:
    return Constraint(kind="json_schema", schema=canonical(schema), name="letter")


def structured(rid: str, constraint: Constraint | None, **sampling: object) -> GenerationRequest:
    req = request(LETTER, rid, **{"max_tokens": 200, **sampling})
    return _with(req, constraint=constraint)


def _with(req: GenerationRequest, **fields: Any) -> GenerationRequest:
    import dataclasses

    return dataclasses.replace(req, **fields)


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def engine() -> AsyncIterator[LlamaCppEngine]:
    spec = flat_spec(id="m", path=smollm2_path(), context_length=1024, parallel=8)
    e = LlamaCppEngine(spec)
    await e.start()
    yield e
    await e.close()


async def chunks(engine: LlamaCppEngine, req: GenerationRequest) -> list[GenerationChunk]:
    out = [c async for c in engine.generate(req)]
    assert out and out[-1].finish_reason is not None
    return out


async def test_seeded_answers_parse_and_validate(engine: LlamaCppEngine) -> None:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    constraint = schema_constraint(SCHEMA)
    reqs = [
        structured(f"s{seed}", constraint, temperature=0.9, seed=seed, repeat_penalty=1.1)
        for seed in range(20)
    ]
    results = []
    for start in range(0, len(reqs), 8):  # eight at a time: one batch per round
        results += await asyncio.gather(*(collect(engine, r) for r in reqs[start : start + 8]))
    for text, last in results:
        assert last.finish_reason == "stop", text
        validator.validate(json.loads(text))


async def test_constrained_and_free_share_a_batch_greedy_unchanged(
    engine: LlamaCppEngine,
) -> None:
    constraint = schema_constraint(SCHEMA)
    questions = ["What is sepsis?", "Define anaemia.", "What is an ECG?", "What is COPD?"]
    reqs = [structured(f"c{i}", constraint, repeat_penalty=1.0 + i / 10) for i in range(4)]
    reqs += [
        request((Message("user", q),), f"f{i}", max_tokens=24) for i, q in enumerate(questions)
    ]
    alone = [await collect(engine, r) for r in reqs]
    together = await asyncio.gather(*(collect(engine, r) for r in reqs))
    assert [t for t, _ in together] == [t for t, _ in alone]
    for text, last in alone[:4]:
        assert last.finish_reason == "stop"
        jsonschema.validate(json.loads(text), SCHEMA)
    # The reference: the grammar inside the sampler chain (Llama._init_sampler's order),
    # applied to the whole vocabulary at every token.
    scheduler = engine._scheduler
    assert scheduler is not None
    scheduler.grammar_in_chain = True
    try:
        reference = [await collect(engine, r) for r in reqs[:4]]
    finally:
        scheduler.grammar_in_chain = False
    assert [t for t, _ in reference] == [t for t, _ in alone[:4]]


async def test_json_object_answers_an_object(engine: LlamaCppEngine) -> None:
    # Greedy SmolLM2 writes one object and ends it (checked) when a short one fits.
    ask = (Message("user", 'Answer in JSON: {"city": ...}. What is the capital of France?'),)
    req = _with(request(ask, "o", max_tokens=60), constraint=Constraint(kind="json_object"))
    text, last = await collect(engine, req)
    assert last.finish_reason == "stop", text
    assert isinstance(json.loads(text), dict)


async def test_budget_cut_is_length(engine: LlamaCppEngine) -> None:
    text, last = await collect(engine, structured("cut", schema_constraint(SCHEMA), max_tokens=6))
    assert last.finish_reason == "length" and last.completion_tokens == 6
    with pytest.raises(ValueError):
        json.loads(text)


async def test_logprobs_of_greedy_tokens(engine: LlamaCppEngine) -> None:
    req = _with(request(LETTER, "lp", max_tokens=30, repeat_penalty=1.0), logprobs=5)
    out = await chunks(engine, req)
    entries = [e for c in out for e in c.logprobs]
    text = "".join(c.text for c in out)
    assert len(entries) == out[-1].completion_tokens
    assert b"".join(e.token_bytes for e in entries).decode() == text
    for chunk in out:  # each chunk carries the entries of the text it carries
        assert b"".join(e.token_bytes for e in chunk.logprobs).decode() == chunk.text
    for e in entries:
        assert len(e.top) == 5
        assert e.top[0].token_bytes == e.token_bytes  # greedy: the most likely token
        assert math.isclose(e.top[0].logprob, e.logprob)
        assert all(a.logprob >= b.logprob for a, b in zip(e.top, e.top[1:], strict=False))
        total = sum(math.exp(t.logprob) for t in e.top)
        assert 0 < math.exp(e.logprob) <= total <= 1 + 1e-6


async def test_logprobs_stop_sequence_tokens_are_not_reported(engine: LlamaCppEngine) -> None:
    base = request(LETTER, "full", max_tokens=30, repeat_penalty=1.0)
    full, _ = await collect(engine, base)
    stop = full[12:16]
    out = await chunks(engine, _with(base, sampling=_with_stop(base, stop), logprobs=0))
    text = "".join(c.text for c in out)
    assert text == full[: full.index(stop)]
    sent = b"".join(e.token_bytes for c in out for e in c.logprobs).decode()
    assert sent.startswith(text) and len(sent) < len(text) + len(stop)
    assert all(e.top == () for c in out for e in c.logprobs)


def _with_stop(req: GenerationRequest, stop: str) -> Any:
    import dataclasses

    return dataclasses.replace(req.sampling, stop=(stop,))


async def test_no_logprobs_unless_asked(engine: LlamaCppEngine) -> None:
    out = await chunks(engine, request(LETTER, "plain", max_tokens=10))
    assert all(c.logprobs == () for c in out)


def call_of(out: list[GenerationChunk]) -> tuple[str, str, str]:
    deltas = [d for c in out for d in c.tool_calls]
    assert deltas and all(d.index == 0 for d in deltas) and not "".join(c.text for c in out)
    assert deltas[0].id is not None and deltas[0].name is not None
    assert all(d.id is None and d.name is None for d in deltas[1:])
    return deltas[0].id, deltas[0].name, "".join(d.arguments for d in deltas)


async def test_named_tool_call(engine: LlamaCppEngine) -> None:
    req = _with(
        request((Message("user", "The pulse is 82 beats per minute."),), "t", max_tokens=60),
        constraint=Constraint(kind="tool", schema=VITALS.parameters, name=VITALS.name),
        tools=(VITALS, ALLERGY),
        tool_choice=NamedTool(VITALS.name),
    )
    out = await chunks(engine, req)
    call_id, name, arguments = call_of(out)
    assert CALL_ID.match(call_id) and name == VITALS.name
    jsonschema.validate(json.loads(arguments), json.loads(VITALS.parameters))
    assert out[-1].finish_reason == "tool_calls"
    assert sum(len(c.tool_calls) for c in out) > 1  # the arguments came in pieces


async def test_required_tool_call(engine: LlamaCppEngine) -> None:
    tools = (VITALS, ALLERGY)
    envelope = {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": t.name}, "arguments": json.loads(t.parameters)},
                "required": ["name", "arguments"],
            }
            for t in tools
        ]
    }
    req = _with(
        request((Message("user", "She is allergic to penicillin."),), "r", max_tokens=60),
        constraint=Constraint(kind="tool", schema=canonical(envelope)),
        tools=tools,
        tool_choice="required",
    )
    out = await chunks(engine, req)
    call_id, name, arguments = call_of(out)
    assert CALL_ID.match(call_id)
    chosen = {t.name: t for t in tools}[name]
    jsonschema.validate(json.loads(arguments), json.loads(chosen.parameters))
    assert out[-1].finish_reason == "tool_calls"


async def test_auto_tool_choice_refused_without_template_support(engine: LlamaCppEngine) -> None:
    req = _with(request(LETTER, "a"), tools=(VITALS,), tool_choice="auto")
    with pytest.raises(InvalidRequestError) as caught:
        await chunks(engine, req)
    assert caught.value.param == "tool_choice"
    assert "required" in caught.value.message


async def test_tool_history_rendered_as_text(engine: LlamaCppEngine) -> None:
    history = (
        Message("user", "Pulse 82."),
        Message("assistant", "", tool_calls=(ToolCall("call_1", VITALS.name, '{"pulse":82}'),)),
        Message("tool", "saved", tool_call_id="call_1"),
    )
    prompt = await engine.render_chat(history, (VITALS,))
    assert '{"name": "record_vitals", "arguments": {"pulse": 82}}' in prompt.text
    assert "<|im_start|>tool\nsaved<|im_end|>" in prompt.text


async def test_control_token_text_in_tools_refused(engine: LlamaCppEngine) -> None:
    bad = Tool(name="f", parameters='{"type":"object"}', description="x<|im_end|>y")
    with pytest.raises(InvalidRequestError) as caught:
        await engine.render_chat((Message("user", "hi"),), (bad,))
    assert caught.value.code == "control_token_text" and caught.value.param == "tools"


# A Hermes/Qwen-style template (tools rendered with tojson, calls as <tool_call> blocks).
HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
You may call these functions:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Return each call as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for tc in message.tool_calls %}
<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


@pytest.fixture(scope="module")
async def hermes(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LlamaCppEngine]:
    template = tmp_path_factory.mktemp("template") / "hermes.jinja"
    template.write_text(HERMES_TEMPLATE)
    spec = flat_spec(
        id="m", path=smollm2_path(), context_length=1024, parallel=2, chat_template=str(template)
    )
    e = LlamaCppEngine(spec)
    await e.start()
    yield e
    await e.close()


async def test_tools_aware_template_renders_tools_and_calls(hermes: LlamaCppEngine) -> None:
    history = (
        Message("user", "Pulse 82. <|im_end|> stays text here"),
        Message("assistant", "", tool_calls=(ToolCall("call_1", VITALS.name, '{"pulse":82}'),)),
        Message("tool", "saved", tool_call_id="call_1"),
    )
    prompt = await hermes.render_chat(history, (VITALS,))
    assert '"description": "Record the patient\'s pulse."' in prompt.text
    assert '<tool_call>\n{"name": "record_vitals", "arguments": {"pulse":82}}' in prompt.text
    assert "<tool_response>\nsaved\n</tool_response>" in prompt.text
    # Client text stays text: the message's "<|im_end|>" is not the control token.
    im_end = 2
    markup = prompt.text.count("<|im_end|>") - 1
    assert list(prompt.token_ids).count(im_end) == markup


async def test_auto_tool_choice_on_a_hermes_template(hermes: LlamaCppEngine) -> None:
    req = _with(
        request((Message("user", "Record a pulse of 82."),), "auto", max_tokens=60),
        tools=(VITALS,),
        tool_choice="auto",
    )
    out = await chunks(hermes, req)
    calls = [d for c in out for d in c.tool_calls]
    if out[-1].finish_reason == "tool_calls":
        assert calls and all(d.name and json.loads(d.arguments) is not None for d in calls)
    else:  # no call, or a block that does not parse: returned as text
        assert not calls
