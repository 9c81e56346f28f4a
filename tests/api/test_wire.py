"""The HTTP wire, kind by kind: malformed Unicode, OpenAI's ranges and types, errors that
name the field the client sent and never echo client text, and headers on every response.

Table-driven on the fake engine (context window of 64 "tokens").
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import pytest
from fastapi.testclient import TestClient

from medserve.engines.fake import FakeEngine
from tests.conftest import SECRET

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MODEL = "fake-echo"
# What a client that cut an emoji in half sends: a lone surrogate escape.
CUT = SECRET + "\ud83d"


class Reply(Protocol):
    """What the tests read of a TestClient response (httpx's or httpx2's, as installed)."""

    @property
    def status_code(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def text(self) -> str: ...
    def json(self) -> Any: ...


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], **fields}


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "hello", **fields}


def post(client: TestClient, path: str, body: Any, **kw: Any) -> Reply:
    # json.dumps escapes non-ASCII, so a lone surrogate travels as `\ud83d`, as in the wild.
    content = json.dumps(body).encode()
    return client.post(path, content=content, headers={"content-type": "application/json"}, **kw)


def assert_no_secret(r: Reply) -> None:
    assert SECRET not in r.text
    for name, value in r.headers.items():
        assert SECRET not in name and SECRET not in value


def assert_error(r: Reply, status: int, param: str | None, code: str | None) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"]) == (param, code), error
    assert_no_secret(r)


# --- Issue 12.2: every string from JSON must have a UTF-8 form --------------------------

UNICODE_CASES: list[tuple[str, str, dict[str, Any], str]] = [
    ("content", CHAT, chat(messages=[{"role": "user", "content": CUT}]), "messages[0].content"),
    (
        "text part",
        CHAT,
        chat(
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "ok"}, {"type": "text", "text": CUT}],
                }
            ]
        ),
        "messages[0].content[1].text",
    ),
    (
        "developer content",
        CHAT,
        chat(messages=[{"role": "developer", "content": CUT}]),
        "messages[0].content",
    ),
    (
        "name",
        CHAT,
        chat(messages=[{"role": "user", "content": "hi", "name": "J\ud83d"}]),
        "messages[0].name",
    ),
    ("model", CHAT, chat(model=CUT), "model"),
    ("user", CHAT, chat(user="ward\ud83d"), "user"),
    ("stop string", CHAT, chat(stop=CUT[-20:]), "stop"),
    ("stop list", CHAT, chat(stop=["ok", CUT[-20:]]), "stop[1]"),
    ("logit_bias key", CHAT, chat(logit_bias={CUT: 1}), "logit_bias"),
    (
        "response_format nested",
        CHAT,
        chat(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "n", "schema": {CUT: CUT}},
            }
        ),
        "response_format.json_schema.schema",
    ),
    (
        "tools nested",
        CHAT,
        chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"x": CUT}}}]),
        "tools[0].function.parameters",
    ),
    (
        "tool description",
        CHAT,
        chat(tools=[{"type": "function", "function": {"name": "f", "description": CUT}}]),
        "tools[0].function.description",
    ),
    (
        "tool call arguments",
        CHAT,
        chat(
            messages=[
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "f", "arguments": CUT},
                        }
                    ],
                }
            ]
        ),
        "messages[0].tool_calls[0].function.arguments",
    ),
    (
        "tool_call_id",
        CHAT,
        chat(messages=[{"role": "tool", "content": "x", "tool_call_id": CUT}]),
        "messages[0].tool_call_id",
    ),
    ("functions", CHAT, chat(functions=[{"name": CUT}]), "functions[0]"),
    ("function_call", CHAT, chat(function_call=CUT), "function_call"),
    ("prompt", COMPLETIONS, completion(prompt=CUT), "prompt"),
    ("prompt list", COMPLETIONS, completion(prompt=[CUT]), "prompt[0]"),
    ("prompt list nested", COMPLETIONS, completion(prompt=["ok", [CUT]]), "prompt[1]"),
    ("suffix", COMPLETIONS, completion(suffix=CUT), "suffix"),
    ("completion stop", COMPLETIONS, completion(stop=[CUT[-20:]]), "stop[0]"),
    ("completion user", COMPLETIONS, completion(user="\udc80"), "user"),
]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [case[1:] for case in UNICODE_CASES],
    ids=[case[0] for case in UNICODE_CASES],
)
def test_malformed_unicode_is_a_400_naming_the_parameter(
    client: TestClient, path: str, body: dict[str, Any], param: str
) -> None:
    r = post(client, path, body)
    assert_error(r, 400, param, None)
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "Unicode" in r.json()["error"]["message"]


def test_well_formed_unicode_still_served(client: TestClient) -> None:
    text = "Zoë 🫀 ÷ 心臓"  # multibyte and a whole surrogate pair (escaped by json.dumps)
    r = post(client, CHAT, chat(messages=[{"role": "user", "content": text}], user="zoë"))
    assert r.status_code == 200, r.text
    assert text in r.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("raw", ["%ED%A0%BD", "%FF%FE", "%C3"])
def test_malformed_utf8_in_the_model_path_is_a_404(client: TestClient, raw: str) -> None:
    r = client.get(f"/v1/models/{SECRET}{raw}")
    assert_error(r, 404, "model", "model_not_found")


# --- Issue 12.2: every response carries the request id and the security headers -------

SECURITY = {
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


def _crash(c: TestClient, engine: FakeEngine) -> Reply:
    async def broken(request: Any) -> Any:
        raise RuntimeError(SECRET)  # a library bug whose message quotes its input
        yield  # pragma: no cover

    engine.generate = broken  # type: ignore[method-assign]
    return post(c, CHAT, chat())


def _crash_rendering(c: TestClient, engine: FakeEngine) -> Reply:
    async def broken(messages: Any) -> Any:
        raise UnicodeEncodeError("utf-8", SECRET, 0, 1, "surrogates not allowed")

    engine.render_chat = broken  # type: ignore[method-assign]
    return post(c, CHAT, chat())


def _draining(c: TestClient, engine: FakeEngine) -> Reply:
    c.app.state.draining = True  # type: ignore[attr-defined]
    return post(c, CHAT, chat())


Scenario = Callable[[TestClient, FakeEngine], Reply]
RESPONSES: list[tuple[str, Scenario, int]] = [
    ("200 models", lambda c, e: c.get("/v1/models"), 200),
    ("200 chat", lambda c, e: post(c, CHAT, chat()), 200),
    ("200 stream", lambda c, e: post(c, CHAT, chat(stream=True)), 200),
    ("400", lambda c, e: post(c, CHAT, chat(temperature=3)), 400),
    ("400 unicode", lambda c, e: post(c, COMPLETIONS, completion(prompt=CUT)), 400),
    ("401", lambda c, e: c.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401),
    ("404", lambda c, e: c.get("/v1/nothing"), 404),
    ("404 model", lambda c, e: post(c, CHAT, chat(model="nope")), 404),
    ("405", lambda c, e: c.get(CHAT), 405),
    ("413", lambda c, e: post(c, CHAT, chat(user="u" * 5000)), 413),
    ("500 engine crash", _crash, 500),
    ("500 render crash", _crash_rendering, 500),
    ("503 draining", _draining, 503),
]


def _request_records(db: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT body FROM records ORDER BY seq").fetchall()
    finally:
        conn.close()
    return [r for r in (json.loads(body) for (body,) in rows) if r["kind"] == "request"]


@pytest.mark.parametrize(
    ("scenario", "status"), [case[1:] for case in RESPONSES], ids=[case[0] for case in RESPONSES]
)
def test_every_response_has_request_id_security_headers_and_a_record(
    client: TestClient, fake_engine: FakeEngine, audit_path: Path, scenario: Scenario, status: int
) -> None:
    r = scenario(client, fake_engine)
    assert r.status_code == status, r.text
    request_id = r.headers.get("x-request-id", "")
    assert len(request_id) == 32 and int(request_id, 16) >= 0
    for name, value in SECURITY.items():
        assert r.headers.get(name) == value, name
    assert_no_secret(r)
    if status != 200:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        if status == 500:
            assert error["type"] == "server_error" and error["message"]
    (record,) = [rec for rec in _request_records(audit_path) if rec["request_id"] == request_id]
    assert record["status"] == status


# --- Issue 12.3: OpenAI's published ranges and types -----------------------------------
# Source: OpenAI's API reference as openai/openai-openapi's openapi.yaml states it
# (CreateChatCompletionRequest, CreateCompletionRequest, StopConfiguration). medserve's own
# bounds where that says nothing: user <= 256 characters, max_tokens >= 1 (OpenAI's API
# answers 0 with "expected a value >= 1" for chat; the legacy endpoint allows 0, meant for
# `echo`, which medserve does not implement).
INT64 = 2**63
UNSUPPORTED = "unsupported_parameter"
# (endpoint, field, values just inside (and the error code expected, None = served),
#  values just outside)
RANGES: list[tuple[str, str, list[tuple[Any, str | None]], list[Any]]] = [
    (CHAT, "temperature", [(0, None), (2, None), (1.5, None)], [-0.01, 2.01]),
    (CHAT, "top_p", [(0, None), (0.0, None), (1, None)], [-0.01, 1.01]),
    (CHAT, "frequency_penalty", [(-2, None), (2, None)], [-2.01, 2.01]),
    (CHAT, "presence_penalty", [(-2, None), (2, None)], [-2.01, 2.01]),
    (CHAT, "max_tokens", [(1, None)], [0, -1]),
    (CHAT, "max_completion_tokens", [(1, None)], [0]),
    (COMPLETIONS, "max_tokens", [(1, None)], [0]),
    (CHAT, "seed", [(-INT64, None), (INT64 - 1, None)], [-INT64 - 1, INT64]),
    (COMPLETIONS, "seed", [(-INT64, None), (INT64 - 1, None)], [-INT64 - 1, INT64]),
    (CHAT, "n", [(1, None), (128, UNSUPPORTED)], [0, 129]),
    (CHAT, "stop", [(["a", "b", "c", "d"], None), ("a", None)], [["a", "b", "c", "d", "e"]]),
    # top_logprobs inside its range: with logprobs true, in tests/api/test_structured.py
    (CHAT, "top_logprobs", [], [-1, 21]),
    (COMPLETIONS, "logprobs", [(0, None), (5, None)], [-1, 6]),
    (COMPLETIONS, "best_of", [(0, None), (1, None), (20, UNSUPPORTED)], [-1, 21]),
    (
        CHAT,
        "logit_bias",
        [({}, None), ({"0": -100}, UNSUPPORTED), ({"50256": 100}, UNSUPPORTED)],
        [{"0": -101}, {"0": 101}, {"x": 1}, {"1": "5"}, {"1": True}, ["1"], "1"],
    ),
    (CHAT, "user", [("u" * 256, None)], ["u" * 257]),
    # medserve's extensions (llama.cpp's names): their own ranges, same rule
    (CHAT, "repeat_penalty", [(0.01, None), (2, None)], [0, -0.5, 2.01]),
    (CHAT, "min_p", [(0, None), (1, None)], [-0.01, 1.01]),
    (CHAT, "top_k", [(0, None), (100, None)], [-1]),
]
INSIDE = [
    pytest.param(path, field, value, code, id=f"{path}-{field}={value!r}"[:60])
    for path, field, inside, _ in RANGES
    for value, code in inside
]
OUTSIDE = [
    pytest.param(path, field, value, id=f"{path}-{field}={value!r}"[:60])
    for path, field, _, outside in RANGES
    for value in outside
]


def _body(path: str, **fields: Any) -> dict[str, Any]:
    return chat(**fields) if path == CHAT else completion(**fields)


@pytest.mark.parametrize(("path", "field", "value", "code"), INSIDE)
def test_values_inside_openais_ranges_are_accepted(
    client: TestClient, path: str, field: str, value: Any, code: str | None
) -> None:
    r = post(client, path, _body(path, **{field: value}))
    if code is None:
        assert r.status_code == 200, r.text
    else:  # accepted by the schema, then refused by name as not implemented
        assert_error(r, 400, field, code)


@pytest.mark.parametrize(("path", "field", "value"), OUTSIDE)
def test_values_outside_openais_ranges_are_a_400_naming_the_field(
    client: TestClient, path: str, field: str, value: Any
) -> None:
    assert_error(post(client, path, _body(path, **{field: value})), 400, field, None)


NUMBERS = [
    (CHAT, "temperature"),
    (CHAT, "top_p"),
    (CHAT, "frequency_penalty"),
    (CHAT, "presence_penalty"),
    (CHAT, "max_tokens"),
    (CHAT, "max_completion_tokens"),
    (CHAT, "seed"),
    (CHAT, "n"),
    (CHAT, "top_logprobs"),
    (COMPLETIONS, "max_tokens"),
    (COMPLETIONS, "logprobs"),
    (COMPLETIONS, "best_of"),
    (CHAT, "top_k"),
    (CHAT, "min_p"),
    (CHAT, "repeat_penalty"),
]


@pytest.mark.parametrize("value", ["0.5", "1", True, None], ids=["str", "str-int", "bool", "ok"])
@pytest.mark.parametrize(("path", "field"), NUMBERS)
def test_numbers_must_be_json_numbers(
    client: TestClient, path: str, field: str, value: Any
) -> None:
    r = post(client, path, _body(path, **{field: value}))
    if value is None:  # null: the default
        assert r.status_code == 200, r.text
        return
    assert_error(r, 400, field, None)
    assert "Invalid type" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        (CHAT, "max_tokens", 5.0),
        (CHAT, "seed", 1.5),
        (CHAT, "temperature", float("nan")),
        (CHAT, "top_p", float("inf")),
        (CHAT, "stream", "true"),
        (CHAT, "stream", 1),
        (CHAT, "logprobs", "false"),
        (CHAT, "stream_options", {"include_usage": "yes"}),
        (COMPLETIONS, "echo", 0),
    ],
)
def test_other_wrong_types_are_refused(
    client: TestClient, path: str, field: str, value: Any
) -> None:
    body = _body(path, **{field: value})
    if field == "stream_options":
        body["stream"] = True
        field = "stream_options.include_usage"
    assert_error(post(client, path, body), 400, field, None)


# --- Issue 12.4: errors name the field the client sent --------------------------------

ALIASES: list[tuple[str, str, dict[str, Any], str, str | None]] = [
    (
        "max_completion_tokens",
        CHAT,
        chat(max_completion_tokens=62),
        "max_completion_tokens",
        "context_length_exceeded",
    ),
    ("max_tokens", CHAT, chat(max_tokens=62), "max_tokens", "context_length_exceeded"),
    (
        "both: max_completion_tokens wins",
        CHAT,
        chat(max_completion_tokens=62, max_tokens=1),
        "max_completion_tokens",
        "context_length_exceeded",
    ),
    (
        "legacy max_tokens",
        COMPLETIONS,
        completion(max_tokens=64),
        "max_tokens",
        "context_length_exceeded",
    ),
    ("functions", CHAT, chat(functions=[{"name": "f"}]), "functions", UNSUPPORTED),
    ("function_call", CHAT, chat(function_call="auto"), "function_call", UNSUPPORTED),
    ("tool_choice without tools", CHAT, chat(tool_choice="auto"), "tool_choice", None),
    ("top_logprobs alone", CHAT, chat(top_logprobs=2), "top_logprobs", None),
    (
        "developer role",
        CHAT,
        chat(messages=[{"role": "developer", "content": None}]),
        "messages[0].content",
        None,
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "param", "code"),
    [case[1:] for case in ALIASES],
    ids=[case[0] for case in ALIASES],
)
def test_errors_name_the_field_the_client_sent(
    client: TestClient, path: str, body: dict[str, Any], param: str, code: str | None
) -> None:
    r = post(client, path, body)
    assert_error(r, 400, param, code)
    message = r.json()["error"]["message"]
    for other in ("max_tokens", "max_completion_tokens"):
        if other != param and code == "context_length_exceeded":
            assert other not in message.replace(param, "")


def test_unsent_completion_budget_is_cut_to_fit(client: TestClient) -> None:
    """OpenAI's default of 16 tokens is a default, not the client's request: near the end of
    the window it is cut to what fits (as chat's default is), not an error about a field
    the client never sent."""
    prompt = " ".join(["w"] * 60)  # 60 of the fake model's 64 tokens
    r = post(client, COMPLETIONS, completion(prompt=prompt))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4


# --- Issue 13.4: no client text in any error, nor in a redirect -----------------------

LEAKS: list[tuple[str, str, str, Any, int, str | None]] = [
    ("logit_bias key", "POST", CHAT, chat(logit_bias={SECRET: "x"}), 400, "logit_bias"),
    ("logit_bias key number", "POST", CHAT, chat(logit_bias={SECRET: 1}), 400, "logit_bias"),
    ("logit_bias value", "POST", CHAT, chat(logit_bias={"1": SECRET}), 400, "logit_bias"),
    ("logit_bias deep", "POST", CHAT, chat(logit_bias={SECRET: {SECRET: 1}}), 400, "logit_bias"),
    (
        "response_format type",
        "POST",
        CHAT,
        chat(response_format={"type": SECRET}),
        400,
        "response_format.type",
    ),
    ("response_format wrong", "POST", CHAT, chat(response_format=[SECRET]), 400, "response_format"),
    ("tools", "POST", CHAT, chat(tools=[{SECRET: {SECRET: SECRET}}]), 400, "tools[0].type"),
    ("tools not a list", "POST", CHAT, chat(tools={SECRET: 1}), 400, "tools"),
    ("five stops", "POST", CHAT, chat(stop=[SECRET] * 5), 400, "stop"),
    ("stop too long", "POST", CHAT, chat(stop=SECRET * 10), 400, "stop"),
    ("stop wrong type", "POST", CHAT, chat(stop={SECRET: SECRET}), 400, "stop"),
    (
        "role",
        "POST",
        CHAT,
        chat(messages=[{"role": SECRET, "content": "x"}]),
        400,
        "messages[0].role",
    ),
    (
        "part type",
        "POST",
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": SECRET}]}]),
        400,
        "messages[0].content[0].type",
    ),
    (
        "content object",
        "POST",
        CHAT,
        chat(messages=[{"role": "user", "content": {SECRET: SECRET}}]),
        400,
        "messages[0].content",
    ),
    ("message not object", "POST", CHAT, chat(messages=[SECRET]), 400, "messages[0]"),
    (
        "name too long",
        "POST",
        CHAT,
        chat(messages=[{"role": "user", "content": "x", "name": SECRET * 3}]),
        400,
        "messages[0].name",
    ),
    ("user too long", "POST", CHAT, chat(user=SECRET * 10), 400, "user"),
    ("temperature", "POST", CHAT, chat(temperature=SECRET), 400, "temperature"),
    ("n", "POST", CHAT, chat(n=SECRET), 400, "n"),
    ("stream", "POST", CHAT, chat(stream=SECRET), 400, "stream"),
    (
        "stream_options",
        "POST",
        CHAT,
        chat(stream=True, stream_options={"include_usage": SECRET}),
        400,
        "stream_options.include_usage",
    ),
    ("model type", "POST", CHAT, chat(model={SECRET: SECRET}), 400, "model"),
    ("unknown top-level key", "POST", CHAT, {SECRET: {SECRET: 1}, "model": MODEL}, 400, "messages"),
    ("metadata ignored", "POST", CHAT, chat(metadata={SECRET: SECRET}), 200, None),
    ("prompt object", "POST", COMPLETIONS, completion(prompt={SECRET: SECRET}), 400, "prompt"),
    ("suffix type", "POST", COMPLETIONS, completion(suffix={SECRET: 1}), 400, "suffix"),
    ("best_of", "POST", COMPLETIONS, completion(best_of=SECRET), 400, "best_of"),
    ("trailing slash chat", "POST", CHAT + "/", chat(), 404, None),
    ("trailing slash models", "GET", "/v1/models/", None, 404, "model"),
    ("trailing slash health", "GET", "/health/", None, 404, None),
    ("unknown path", "GET", f"/v1/{SECRET}", None, 404, None),
    ("unknown model path", "GET", f"/v1/models/{SECRET}", None, 404, "model"),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "param"),
    [case[1:] for case in LEAKS],
    ids=[case[0] for case in LEAKS],
)
def test_no_client_text_in_any_response(
    client: TestClient, method: str, path: str, body: Any, status: int, param: str | None
) -> None:
    # The Host header is client text too: a redirect would build its Location from it.
    headers = {"host": f"{SECRET.lower()}.example", "content-type": "application/json"}
    content = None if body is None else json.dumps(body).encode()
    r = client.request(method, path, content=content, headers=headers, follow_redirects=False)
    assert r.status_code == status, r.text
    assert "location" not in r.headers
    assert SECRET.lower() not in r.text.lower()
    for name, value in r.headers.items():
        assert SECRET.lower() not in f"{name}{value}".lower()
    if status != 200:
        assert r.json()["error"]["param"] == param


def test_too_many_stops_says_the_limit(client: TestClient) -> None:
    r = post(client, CHAT, chat(stop=["a", "b", "c", "d", "e"]))
    assert_error(r, 400, "stop", None)
    assert "at most 4" in r.json()["error"]["message"]


JSON_HEADERS = {"Content-Type": "application/json"}
# How a body can fail to be JSON that medserve reads: (headers, raw body, status, message
# fragment). Each names the real problem instead of a generic "could not be processed".
BODIES = {
    "curl -d (form type)": (
        {"Content-Type": "application/x-www-form-urlencoded"},
        json.dumps(chat()).encode(),
        400,
        "Content-Type: application/json",
    ),
    "text/plain": (
        {"Content-Type": "text/plain"},
        json.dumps(chat()).encode(),
        400,
        "Content-Type: application/json",
    ),
    "not UTF-8": (
        JSON_HEADERS,
        b'{"model": "fake-echo", "messages": [{"role": "user", "content": "Hi \xff\xfe"}]}',
        400,
        "not valid JSON",
    ),
    "gzip, not decoded": (
        {**JSON_HEADERS, "Content-Encoding": "gzip"},
        json.dumps(chat()).encode(),
        415,
        "Content-Encoding",
    ),
}


@pytest.mark.parametrize(("headers", "raw", "status", "says"), BODIES.values(), ids=BODIES.keys())
def test_a_body_medserve_cannot_read_names_the_problem(
    client: TestClient, headers: dict[str, str], raw: bytes, status: int, says: str
) -> None:
    r = client.post(CHAT, content=raw, headers=headers)
    assert r.status_code == status, r.text
    assert says in r.json()["error"]["message"]
    assert "Hi" not in r.text


def test_a_405_lists_the_allowed_methods(client: TestClient) -> None:
    r = client.delete("/v1/models")
    assert r.status_code == 405
    assert r.headers["allow"] == "GET"
    assert r.json()["error"]["code"] == "method_not_allowed"
