"""Every bad request gets the right status and an OpenAI envelope naming the parameter.

Table-driven on the fake engine (context window of 64 "tokens"). Each body carries the
SECRET marker where a prompt would be, and no error body may contain it.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from medserve.engines.base import GenerationChunk
from medserve.errors import OverloadedError, RequestTimeoutError
from tests.conftest import SECRET
from tests.sse import payloads

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MODEL = "fake-echo"


def chat(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": SECRET}]}
    body.update(fields)
    return body


def completion(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "prompt": SECRET}
    body.update(fields)
    return body


LONG = " ".join([SECRET] * 80)  # 80 words > the fake model's 64-token context

# (id, path, body, status, param, code)
CASES: list[tuple[str, str, Any, int, str | None, str | None]] = [
    ("missing messages", CHAT, {"model": MODEL}, 400, "messages", None),
    ("empty messages", CHAT, chat(messages=[]), 400, "messages", None),
    ("messages not a list", CHAT, chat(messages=SECRET), 400, "messages", None),
    (
        "unknown role",
        CHAT,
        chat(messages=[{"role": "doctor", "content": SECRET}]),
        400,
        "messages[0].role",
        None,
    ),
    (
        "tool message answering no call",
        CHAT,
        chat(messages=[{"role": "tool", "content": SECRET}]),
        400,
        "messages[0].tool_call_id",
        None,
    ),
    (
        "content wrong type",
        CHAT,
        chat(messages=[{"role": "user", "content": 42}]),
        400,
        "messages[0].content",
        None,
    ),
    (
        "content null",
        CHAT,
        chat(messages=[{"role": "user", "content": None}]),
        400,
        "messages[0].content",
        None,
    ),
    (
        "image part",
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        400,
        "messages[0].content[0].type",
        None,
    ),
    (
        "missing model",
        CHAT,
        {"messages": [{"role": "user", "content": SECRET}]},
        400,
        "model",
        None,
    ),
    ("temperature too high", CHAT, chat(temperature=2.5), 400, "temperature", None),
    ("temperature negative", CHAT, chat(temperature=-0.1), 400, "temperature", None),
    ("temperature not a number", CHAT, chat(temperature=SECRET), 400, "temperature", None),
    ("top_p above one", CHAT, chat(top_p=1.01), 400, "top_p", None),
    ("max_tokens zero", CHAT, chat(max_tokens=0), 400, "max_tokens", None),
    ("max_tokens negative", CHAT, chat(max_tokens=-5), 400, "max_tokens", None),
    ("max_tokens string", CHAT, chat(max_tokens="many"), 400, "max_tokens", None),
    (
        "max_completion_tokens zero",
        CHAT,
        chat(max_completion_tokens=0),
        400,
        "max_completion_tokens",
        None,
    ),
    ("n above one", CHAT, chat(n=2), 400, "n", "unsupported_parameter"),
    (
        "tool without function",
        CHAT,
        chat(tools=[{"type": "function"}]),
        400,
        "tools[0].function",
        None,
    ),
    ("tool_choice without tools", CHAT, chat(tool_choice="required"), 400, "tool_choice", None),
    ("top_logprobs without logprobs", CHAT, chat(top_logprobs=2), 400, "top_logprobs", None),
    (
        "json_schema without its schema",
        CHAT,
        chat(response_format={"type": "json_schema"}),
        400,
        "response_format.json_schema",
        None,
    ),
    ("logit_bias", CHAT, chat(logit_bias={"1": 5}), 400, "logit_bias", "unsupported_parameter"),
    (
        "stream_options without stream",
        CHAT,
        chat(stream_options={"include_usage": True}),
        400,
        "stream_options",
        None,
    ),
    ("five stop sequences", CHAT, chat(stop=["a", "b", "c", "d", "e"]), 400, "stop", None),
    ("stop too long", CHAT, chat(stop="s" * 257), 400, "stop", None),
    ("user too long", CHAT, chat(user="u" * 300), 400, "user", None),
    (
        "prompt over context",
        CHAT,
        chat(messages=[{"role": "user", "content": LONG}]),
        400,
        "messages",
        "context_length_exceeded",
    ),
    (
        "prompt plus max_tokens over context",
        CHAT,
        chat(max_tokens=62),
        400,
        "max_tokens",
        "context_length_exceeded",
    ),
    ("unknown model", CHAT, chat(model="gpt-4o"), 404, "model", "model_not_found"),
    ("unknown model holding text", CHAT, chat(model=SECRET), 404, "model", "model_not_found"),
    ("completion missing prompt", COMPLETIONS, {"model": MODEL}, 400, "prompt", None),
    (
        "completion token array",
        COMPLETIONS,
        completion(prompt=[1, 2, 3]),
        400,
        "prompt",
        "unsupported_parameter",
    ),
    (
        "completion batch",
        COMPLETIONS,
        completion(prompt=[SECRET, SECRET]),
        400,
        "prompt",
        "unsupported_parameter",
    ),
    ("completion echo", COMPLETIONS, completion(echo=True), 400, "echo", "unsupported_parameter"),
    ("completion best_of", COMPLETIONS, completion(best_of=3), 400, "best_of", None),
    ("completion suffix", COMPLETIONS, completion(suffix=SECRET), 400, "suffix", None),
    ("completion max_tokens zero", COMPLETIONS, completion(max_tokens=0), 400, "max_tokens", None),
    (
        "completion over context",
        COMPLETIONS,
        completion(prompt=LONG),
        400,
        "prompt",
        "context_length_exceeded",
    ),
    ("completion unknown model", COMPLETIONS, completion(model="x"), 404, "model", None),
]


def assert_envelope(body: dict[str, Any], param: str | None, code: str | None) -> None:
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert SECRET not in json.dumps(body)


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "code"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_bad_request(
    client: TestClient, path: str, body: Any, status: int, param: str | None, code: str | None
) -> None:
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    assert_envelope(r.json(), param, code)


@pytest.mark.parametrize(
    ("content", "headers"),
    [
        (b'{"model": "fake-echo", "messages": [', {"content-type": "application/json"}),
        (b"[1, 2, 3]", {"content-type": "application/json"}),
        (b"", {"content-type": "application/json"}),
        (SECRET.encode(), {"content-type": "application/json"}),
        (SECRET.encode(), {"content-type": "text/plain"}),
    ],
    ids=["truncated json", "array body", "empty body", "not json", "text/plain"],
)
def test_unparseable_bodies_are_400(
    client: TestClient, content: bytes, headers: dict[str, str]
) -> None:
    r = client.post(CHAT, content=content, headers=headers)
    assert r.status_code == 400, r.text
    assert_envelope(r.json(), None, None)


def test_body_over_limit_with_length_is_413(client: TestClient) -> None:
    r = client.post(CHAT, json=chat(messages=[{"role": "user", "content": "x" * 5000}]))
    assert r.status_code == 413
    assert_envelope(r.json(), None, "request_too_large")


def test_chunked_body_over_limit_is_413(client: TestClient) -> None:
    def body() -> Any:
        yield b'{"model": "fake-echo", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}]}'

    r = client.post(CHAT, content=body(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert_envelope(r.json(), None, "request_too_large")


@pytest.mark.parametrize(
    ("method", "path", "status", "param", "code"),
    [
        ("GET", "/v1/nothing-here", 404, None, "not_found"),
        ("GET", "/v1/models/gpt-4o", 404, "model", "model_not_found"),
        ("GET", f"/v1/models/{SECRET}", 404, "model", "model_not_found"),
        ("GET", CHAT, 405, None, "method_not_allowed"),
        ("DELETE", "/v1/models", 405, None, "method_not_allowed"),
    ],
)
def test_routes_errors(
    client: TestClient, method: str, path: str, status: int, param: str | None, code: str
) -> None:
    r = client.request(method, path)
    assert r.status_code == status
    assert_envelope(r.json(), param, code)


def test_engine_failure_is_a_500_envelope(client: TestClient, fake_engine: Any) -> None:
    fake_engine.fail_after = 1
    r = client.post(CHAT, json=chat())
    assert r.status_code == 500
    assert_envelope(r.json(), None, "engine_error")


def test_engine_failure_mid_stream_is_an_error_event(client: TestClient, fake_engine: Any) -> None:
    fake_engine.fail_after = 2
    r = client.post(CHAT, json=chat(stream=True))
    assert r.status_code == 200
    events = payloads(r.text.splitlines())
    assert "[DONE]" not in events  # the error event ends the stream
    error = json.loads(events[-1])
    assert_envelope(error, None, "engine_error")


def test_unexpected_engine_crash_mid_stream_is_an_error_event(
    client: TestClient, fake_engine: Any
) -> None:
    async def broken(request: Any) -> Any:
        yield GenerationChunk("partial")
        raise RuntimeError(SECRET)  # e.g. a library bug whose message quotes its input

    fake_engine.generate = broken
    r = client.post(CHAT, json=chat(stream=True))
    events = payloads(r.text.splitlines())
    assert "[DONE]" not in events  # the error event ends the stream
    assert_envelope(json.loads(events[-1]), None, None)
    assert json.loads(events[-1])["error"]["type"] == "server_error"


def test_unexpected_engine_crash_is_a_500_envelope(client: TestClient, fake_engine: Any) -> None:
    async def broken(request: Any) -> Any:
        raise RuntimeError(SECRET)
        yield  # pragma: no cover

    fake_engine.generate = broken
    r = client.post(CHAT, json=chat())
    assert r.status_code == 500
    assert_envelope(r.json(), None, None)


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (OverloadedError("busy", retry_after=7), 503, "overloaded"),
        (RequestTimeoutError(), 504, "timeout"),
    ],
)
def test_engine_capacity_errors(
    client: TestClient, fake_engine: Any, error: Exception, status: int, code: str
) -> None:
    async def refuse(request: Any) -> Any:
        raise error
        yield  # pragma: no cover

    fake_engine.generate = refuse
    r = client.post(CHAT, json=chat())
    assert r.status_code == status
    assert_envelope(r.json(), None, code)
    if status == 503:
        assert r.headers["retry-after"] == "7"
