"""The success path on the fake engine: response shapes, usage, streaming, parsing."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from fastapi.testclient import TestClient

from medserve.engines.fake import FakeEngine
from tests.conftest import SECRET
from tests.sse import events as sse

CHAT = "/v1/chat/completions"
MODEL = "fake-echo"
MESSAGES = [{"role": "user", "content": "chest pain since this morning"}]
ECHO = "user: chest pain since this morning assistant:"


def test_chat_completion_shape_and_usage(client: TestClient) -> None:
    r = client.post(CHAT, json={"model": MODEL, "messages": MESSAGES})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == MODEL
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": ECHO, "refusal": None}
    assert choice["finish_reason"] == "stop"
    n = len(ECHO.split())
    assert body["usage"] == {"prompt_tokens": n, "completion_tokens": n, "total_tokens": 2 * n}
    assert r.headers["x-request-id"] in body["id"]
    assert r.headers["cache-control"] == "no-store"


def test_completion_shape(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "one two three"})
    body = r.json()
    assert r.status_code == 200
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "one two three"
    assert body["usage"]["prompt_tokens"] == 3


def test_completion_accepts_a_list_of_one_prompt(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": ["a b"]})
    assert r.json()["choices"][0]["text"] == "a b"


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_length_finish(client: TestClient, field: str) -> None:
    r = client.post(CHAT, json={"model": MODEL, "messages": MESSAGES, field: 3})
    body = r.json()
    assert body["choices"][0]["message"]["content"] == "user: chest pain"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize(
    ("stop", "content"),
    [("pain", "user: chest "), (["zzz", "since"], "user: chest pain "), ("absent", ECHO)],
)
def test_stop_sequences(client: TestClient, stop: Any, content: str) -> None:
    r = client.post(CHAT, json={"model": MODEL, "messages": MESSAGES, "stop": stop})
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == content
    assert choice["finish_reason"] == "stop"


@pytest.mark.parametrize("include_usage", [True, False])
def test_streaming_matches_non_streaming(client: TestClient, include_usage: bool) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "stop": "since"}
    whole = client.post(CHAT, json=body).json()
    r = client.post(
        CHAT,
        json={**body, "stream": True, "stream_options": {"include_usage": include_usage}},
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    usage_chunks = [c for c in chunks if c.get("usage")]
    if include_usage:
        assert all("usage" in c for c in chunks)
        assert usage_chunks == [chunks[-1]]
        assert chunks[-1]["choices"] == []
        assert chunks[-1]["usage"] == whole["usage"]
        chunks = chunks[:-1]
    else:
        assert usage_chunks == []
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks]
    assert finishes[-1] == "stop"
    assert set(finishes[:-1]) == {None}


def test_completion_streaming(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "a b c", "stream": True})
    events = sse(r.text)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "a b c"
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_request_is_parsed_into_engine_terms(client: TestClient, fake_engine: FakeEngine) -> None:
    client.post(
        CHAT,
        json={
            "model": MODEL,
            "messages": [
                {"role": "developer", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
            ],
            "temperature": 0,
            "seed": 11,
            "stop": "x",
            "user": "clinician-17",
            "top_k": 5,
        },
    )
    ((req, prompt, max_tokens),) = (
        (g.request, g.prompt, g.max_tokens) for g in fake_engine.history
    )
    assert prompt.text == "system: be brief\nuser: ab\nassistant:"
    s = req.sampling
    assert (s.temperature, s.seed, s.stop, s.top_k) == (0.0, 11, ("x",), 5)
    assert (s.top_p, s.repeat_penalty) == (1.0, 1.1)  # model defaults fill the gaps
    assert max_tokens == 32  # model default, fits the context
    assert req.user == "clinician-17"


def test_default_budget_is_clipped_to_the_context(
    client: TestClient, fake_engine: FakeEngine
) -> None:
    words = " ".join(["w"] * 40)
    client.post(CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": words}]})
    (generation,) = fake_engine.history
    assert generation.max_tokens == 64 - len(generation.prompt.token_ids)


def test_random_seed_when_none_given(client: TestClient, fake_engine: FakeEngine) -> None:
    for _ in range(3):
        client.post(CHAT, json={"model": MODEL, "messages": MESSAGES})
    seeds = {r.sampling.seed for r in fake_engine.requests}
    assert len(seeds) > 1


def test_models_and_probes(client: TestClient) -> None:
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [MODEL]
    card = client.get(f"/v1/models/{MODEL}").json()
    assert card["object"] == "model" and card["context_length"] == 64
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["models"][0]["ready"] is True


def test_ready_is_503_after_the_engine_stops(client: TestClient, fake_engine: FakeEngine) -> None:
    client.portal.call(fake_engine.close)  # type: ignore[union-attr]
    r = client.get("/ready")
    assert r.status_code == 503
    assert r.headers["retry-after"]


def test_logs_never_carry_patient_text(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client.post(CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": SECRET}]})
    client.post(CHAT, json={"model": SECRET, "messages": []})
    client.post(
        CHAT,
        json={"model": MODEL, "messages": [{"role": "user", "content": SECRET}], "temperature": 9},
    )
    client.get(f"/v1/models/{SECRET}?q={SECRET}")
    # The server's records only: the test client logs its own requests' URLs.
    server = [r for r in caplog.records if r.name.startswith(("medserve", "uvicorn"))]
    assert len(server) >= 4, "expected an access line per request"
    for record in server:
        assert SECRET not in record.getMessage()
        assert SECRET not in json.dumps(record.__dict__, default=str)


def test_draining_refuses_new_generation(client: TestClient) -> None:
    client.app.state.draining = True  # type: ignore[attr-defined]
    r = client.post(CHAT, json={"model": MODEL, "messages": MESSAGES})
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "shutting_down"
    assert int(r.headers["retry-after"]) >= 1
    ready = client.get("/ready")
    assert ready.status_code == 503 and ready.json()["status"] == "draining"
    assert client.get("/v1/models").status_code == 200
