"""Structured answers through `medserve serve` to a vLLM replica (the fake upstream), over
HTTP: the client's response_format, tools, tool_choice, tool-call history and logprobs
reach vLLM as the client sent them, and vLLM's tool calls and logprobs reach the client
in OpenAI's shapes, streaming or not.

Needs the wire layer's parsing of those fields (``medserve.api.structured``); in a tree
without it the module skips (the engine-level relay is tests/engines/
test_vllm_structured.py).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import AUTH
from tests.fakeupstream import FakeUpstream, Knobs, logprobs_of, running_upstream
from tests.serverproc import Server, running_server
from tests.sse import DONE, events

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        importlib.util.find_spec("medserve.api.structured") is None,
        reason="the wire layer does not parse structured-answer fields in this tree yet",
    ),
]
MODEL = "med-gpu"
QUESTION = [{"role": "user", "content": "Code this: wheezing at night"}]
SCHEMA = {
    "type": "object",
    "properties": {"code": {"enum": ["J45", "R06.2"]}, "chronic": {"type": "boolean"}},
    "required": ["code", "chronic"],
    "additionalProperties": False,
}
LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup_icd",
        "description": "Find an ICD-10 code",
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string"}},
            "required": ["code"],
        },
    },
}
NOTE = {
    "type": "function",
    "function": {"name": "add_note", "parameters": {"type": "object", "properties": {}}},
}
STRUCTURED = ("response_format", "tools", "tool_choice", "logprobs", "top_logprobs")


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with running_upstream() as server:
        yield server


@pytest.fixture(scope="module")
def server(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("structured-relay")
    config = base / "relay.toml"
    config.write_text(
        f'[[models]]\nid = "{MODEL}"\n[[models.replicas]]\nengine = "vllm"\n'
        f'url = "{upstream.url}"\nserved_model_name = "m"\nfirst_event_timeout_s = 60\n'
    )
    with running_server(base / "medserve.log", "-c", str(config)) as s:
        yield s


@pytest.fixture
def fresh(upstream: FakeUpstream) -> FakeUpstream:
    upstream.knobs = Knobs(text='{"code":"J45","chronic":true}')
    upstream.seen.clear()
    return upstream


def post(server: Server, path: str, body: dict[str, Any]) -> httpx.Response:
    r = httpx.post(f"{server.url}{path}", json={"model": MODEL, **body}, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return r


REQUESTS: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    # (id, path, the client's fields, the structured fields vLLM must get)
    (
        "json-schema",
        "/v1/chat/completions",
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "icd", "schema": SCHEMA, "strict": True},
            }
        },
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "icd", "schema": SCHEMA, "strict": True},
            }
        },
    ),
    (
        "json-object",
        "/v1/chat/completions",
        {"response_format": {"type": "json_object"}},
        {"response_format": {"type": "json_object"}},
    ),
    (
        "named-tool",
        "/v1/chat/completions",
        {
            "tools": [LOOKUP, NOTE],
            "tool_choice": {"type": "function", "function": {"name": "lookup_icd"}},
        },
        {
            "tools": [LOOKUP, NOTE],
            "tool_choice": {"type": "function", "function": {"name": "lookup_icd"}},
        },
    ),
    (
        "required-tool",
        "/v1/chat/completions",
        {"tools": [LOOKUP], "tool_choice": "required"},
        {"tools": [LOOKUP], "tool_choice": "required"},
    ),
    (
        "chat-logprobs",
        "/v1/chat/completions",
        {"logprobs": True, "top_logprobs": 2},
        {"logprobs": True, "top_logprobs": 2},
    ),
    ("completion-logprobs", "/v1/completions", {"logprobs": 2}, {"logprobs": 2}),
]


@pytest.mark.parametrize(
    ("path", "fields", "expected"),
    [case[1:] for case in REQUESTS],
    ids=[case[0] for case in REQUESTS],
)
def test_the_clients_structured_fields_reach_vllm(
    server: Server,
    fresh: FakeUpstream,
    path: str,
    fields: dict[str, Any],
    expected: dict[str, Any],
) -> None:
    if path == "/v1/completions":
        fields = {"prompt": "Code this: wheezing", **fields}
    else:
        fields = {"messages": QUESTION, **fields}
    post(server, path, {"max_tokens": 32, **fields})
    body = fresh.seen[-1].body
    assert {k: body[k] for k in STRUCTURED if k in body} == expected


def test_tool_call_history_reaches_vllm_as_sent(server: Server, fresh: FakeUpstream) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "lookup_icd", "arguments": '{"code":"J45"}'},
    }
    history = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"label":"Asthma"}'},
    ]
    post(server, "/v1/chat/completions", {"messages": history, "tools": [LOOKUP]})
    assert fresh.seen[-1].body["messages"] == history


# What vLLM streams for a named tool call: the id and name first, then argument pieces.
CALL = [
    {
        "index": 0,
        "id": "chatcmpl-tool-1",
        "type": "function",
        "function": {"name": "lookup_icd", "arguments": ""},
    },
    {"index": 0, "function": {"arguments": '{"code": '}},
    {"index": 0, "function": {"arguments": '"J45"}'}},
]


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "non-streaming"])
def test_vllms_tool_calls_reach_the_client(
    server: Server, fresh: FakeUpstream, stream: bool
) -> None:
    fresh.knobs = Knobs(text="", tool_calls=CALL, finish="stop")  # vLLM's named-choice finish
    r = post(
        server,
        "/v1/chat/completions",
        {
            "messages": QUESTION,
            "tools": [LOOKUP],
            "tool_choice": {"type": "function", "function": {"name": "lookup_icd"}},
            "stream": stream,
        },
    )
    if not stream:
        (choice,) = r.json()["choices"]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["tool_calls"] == [
            {
                "id": "chatcmpl-tool-1",
                "type": "function",
                "function": {"name": "lookup_icd", "arguments": '{"code": "J45"}'},
            }
        ]
        return
    sent = events(r.text)
    assert sent[-1] == DONE
    pieces = [d for e in sent[:-1] for c in e["choices"] for d in c["delta"].get("tool_calls", [])]
    assert pieces == CALL
    finishes = [c["finish_reason"] for e in sent[:-1] for c in e["choices"] if c["finish_reason"]]
    assert finishes == ["tool_calls"]


TEXT = "Asthma ünd wheezing"


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "non-streaming"])
@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_vllms_logprobs_reach_the_client(
    server: Server, fresh: FakeUpstream, chat: bool, stream: bool
) -> None:
    fresh.knobs = Knobs(text=TEXT)
    words = TEXT.split()
    pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
    sent_by_vllm = [logprobs_of(p, i, 2, chat) for i, p in enumerate(pieces)]
    if chat:
        fields: dict[str, Any] = {"messages": QUESTION, "logprobs": True, "top_logprobs": 2}
        path = "/v1/chat/completions"
    else:
        fields, path = {"prompt": "Code this", "logprobs": 2}, "/v1/completions"
    r = post(server, path, {**fields, "max_tokens": 32, "stream": stream})
    if stream:
        got = [c["logprobs"] for e in events(r.text)[:-1] for c in e["choices"] if c["logprobs"]]
    else:
        got = [r.json()["choices"][0]["logprobs"]]
    if chat:
        entries = [entry for lp in got for entry in lp["content"]]
        assert entries == [entry for lp in sent_by_vllm for entry in lp["content"]]
        return
    for name in ("tokens", "token_logprobs", "top_logprobs"):
        assert [x for lp in got for x in lp[name]] == [x for lp in sent_by_vllm for x in lp[name]]


def test_tool_choice_auto_on_a_server_without_a_parser_is_a_400(
    server: Server, fresh: FakeUpstream
) -> None:
    fresh.knobs = Knobs(auto_tools=False)
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": MODEL, "messages": QUESTION, "tools": [LOOKUP]},
        headers=AUTH,
        timeout=60,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", "tool_choice")
    for leak in (fresh.url, "127.0.0.1", "--enable-auto-tool-choice", "wheezing"):
        assert leak not in r.text
