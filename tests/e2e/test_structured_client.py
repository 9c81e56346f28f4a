"""End to end (issue 18): structured answers from `medserve serve` with the packaged SmolLM2
model, as apps ask for them with the official openai client: ``beta.chat.completions.parse``
with a pydantic model, a named tool call round trip (call, tool message, answer), and
logprobs of greedy decoding."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Literal

import openai
import pytest
from openai.types.chat import (
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageParam,
    ChatCompletionNamedToolChoiceParam,
    ChatCompletionToolParam,
)
from pydantic import BaseModel

from tests.conftest import DEV_KEY
from tests.serverproc import Server

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
LETTER: list[ChatCompletionMessageParam] = [
    {
        "role": "user",
        "content": "Discharge letter: the patient has high blood pressure and takes "
        "amlodipine 5 mg by mouth daily. Review in 14 days. Extract the facts as JSON.",
    }
]


class Medication(BaseModel):
    route: Literal["oral", "intravenous", "topical"]
    daily: bool


class Extraction(BaseModel):
    """Nested: an object in an object, an enum, a boolean, an integer."""

    specialty: Literal["cardiology", "neurology", "endocrinology", "other"]
    medication: Medication
    follow_up_days: int


LOOKUP: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "lookup_icd10",
        "description": "Look up the ICD-10 code of a diagnosis.",
        "parameters": {
            "type": "object",
            "properties": {"diagnosis": {"type": "string", "enum": ["hypertension", "diabetes"]}},
            "required": ["diagnosis"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
FORCED: ChatCompletionNamedToolChoiceParam = {
    "type": "function",
    "function": {"name": "lookup_icd10"},
}
QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Which ICD-10 code is high blood pressure?"}
]


@pytest.fixture
def client(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{server.url}/v1", api_key=DEV_KEY, max_retries=0, timeout=120
    ) as c:
        yield c


def test_parse_with_a_pydantic_model(client: openai.OpenAI, server: Server) -> None:
    """The client sends the model's JSON schema (strict) and parses the answer with it."""
    r = client.beta.chat.completions.parse(
        model=MODEL,
        messages=LETTER,
        response_format=Extraction,
        max_tokens=120,
        temperature=0,
        seed=1,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Extraction)
    assert choice.message.parsed == Extraction.model_validate_json(choice.message.content or "")
    record = server.audit_record(r.id.removeprefix("chatcmpl-"))
    assert record["constraint"] == "json_schema"
    assert isinstance(record["schema_sha256"], str) and len(record["schema_sha256"]) == 64


def test_a_named_tool_call_round_trip(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        tools=[LOOKUP],
        tool_choice=FORCED,
        max_tokens=60,
        temperature=0,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert not choice.message.content
    (call,) = choice.message.tool_calls or []
    assert isinstance(call, ChatCompletionMessageFunctionToolCall)
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "lookup_icd10"
    assert json.loads(call.function.arguments)["diagnosis"] in ("hypertension", "diabetes")

    history: list[ChatCompletionMessageParam] = [
        *QUESTION,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "I10 (essential hypertension)"},
    ]
    answer = client.chat.completions.create(
        model=MODEL,
        messages=history,
        tools=[LOOKUP],
        tool_choice="none",
        max_tokens=40,
        temperature=0,
    )
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.choices[0].message.content and answer.choices[0].message.content.strip()
    assert not answer.choices[0].message.tool_calls


def test_a_streamed_tool_call_joins_to_the_whole_one(client: openai.OpenAI) -> None:
    """OpenAI's delta shape: the client's stream helper rebuilds the same call."""
    whole = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        tools=[LOOKUP],
        tool_choice=FORCED,
        max_tokens=60,
        temperature=0,
    )
    with client.beta.chat.completions.stream(
        model=MODEL,
        messages=QUESTION,
        tools=[LOOKUP],
        tool_choice=FORCED,
        max_tokens=60,
        temperature=0,
    ) as s:
        final = s.get_final_completion()
    (streamed,) = final.choices[0].message.tool_calls or []
    (expected,) = whole.choices[0].message.tool_calls or []
    assert isinstance(expected, ChatCompletionMessageFunctionToolCall)
    assert streamed.function.name == expected.function.name
    assert streamed.function.arguments == expected.function.arguments
    assert final.choices[0].finish_reason == "tool_calls"


def test_greedy_logprobs_are_the_maximum(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
        extra_body={"repeat_penalty": 1.0},  # no penalty: greedy takes the raw maximum
    )
    logprobs = r.choices[0].logprobs
    assert logprobs is not None and logprobs.content
    assert "".join(t.token for t in logprobs.content) == r.choices[0].message.content
    for t in logprobs.content:
        assert len(t.top_logprobs) == 5
        assert t.logprob <= 0
        assert t.logprob == pytest.approx(max(a.logprob for a in t.top_logprobs))
        assert sum(math.exp(a.logprob) for a in t.top_logprobs) <= 1 + 1e-4
        assert bytes(t.bytes or []).decode("utf-8", "replace") == t.token or "\ufffd" in t.token
