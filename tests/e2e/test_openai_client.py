"""End to end: `medserve serve` with the packaged model, driven by the official openai client."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from itertools import islice

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import AUTH, DEV_KEY, SECRET
from tests.serverproc import Server
from tests.sse import iter_payloads

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is hypertension? Answer in one sentence."}
]
SECRET_MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": SECRET}]


@pytest.fixture
def client(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{server.url}/v1", api_key=DEV_KEY, max_retries=0, timeout=60
    ) as c:
        yield c


def test_models_list(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_completion(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=40)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert r.usage is not None
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert 0 < r.usage.completion_tokens <= 40


def test_completion_length(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=MODEL, prompt="The heart has four", max_tokens=5, temperature=0
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 5


@pytest.mark.anyio
async def test_async_stream_equals_non_stream(server: Server) -> None:
    async with openai.AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key=DEV_KEY, max_retries=0, timeout=60
    ) as aclient:
        await _stream_equals_non_stream(aclient)


async def _stream_equals_non_stream(aclient: openai.AsyncOpenAI) -> None:
    create = aclient.chat.completions.create
    whole = await create(model=MODEL, messages=QUESTION, max_tokens=30, temperature=0, seed=3)
    stream = await create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=30,
        temperature=0,
        seed=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, usage, finish = [], None, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(parts) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and whole.usage is not None
    assert usage.model_dump() == whole.usage.model_dump()


def test_sync_stream_with_stop(client: openai.OpenAI) -> None:
    base = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=30, temperature=0
    )
    text = base.choices[0].message.content or ""
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    stream = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=30,
        temperature=0,
        stop=stop,
        stream=True,
    )
    parts = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(parts) == text[: text.index(stop)]


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 3}, "n"),
        ({"max_tokens": 100_000}, "max_tokens"),
    ],
)
def test_bad_requests_raise_bad_request(
    client: openai.OpenAI, kwargs: dict[str, object], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=SECRET_MESSAGES, extra_body=kwargs)
    assert info.value.status_code == 400
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == param
    assert SECRET not in json.dumps(body)


def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "model_not_found"


def test_disconnect_mid_stream_frees_the_model(server: Server, client: openai.OpenAI) -> None:
    # Greedy with no repeat penalty, SmolLM2 continues this prompt with "la" until
    # max_tokens (checked: 4000 of 4000): well over a minute of decoding here, far past the
    # deadline below, unless the disconnect stops it.
    body = {
        "model": MODEL,
        "prompt": "la " * 50,
        "max_tokens": 4000,
        "temperature": 0,
        "repeat_penalty": 1.0,
        "stream": True,
    }
    with (
        httpx.Client(timeout=60, headers=AUTH) as http,
        http.stream("POST", f"{server.url}/v1/completions", json=body) as r,
    ):
        assert r.status_code == 200
        # Kept in a name: a dropped reader closes httpx's stream, and so the connection.
        events = iter_payloads(r.iter_lines())
        data = list(islice(events, 3))
        assert len(data) == 3
        # Generation runs off the event loop: liveness answers while this stream is open.
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
        ready = httpx.get(f"{server.url}/ready", timeout=5, headers=AUTH).json()["models"][0]
        assert ready["running"] == 1
    # The connection is closed. The model must go idle long before 4000 tokens are done:
    # poll readiness (bounded) until nothing is running.
    deadline = time.monotonic() + 20
    running = None
    while time.monotonic() < deadline:
        running = httpx.get(f"{server.url}/ready", timeout=5, headers=AUTH).json()["models"][0][
            "running"
        ]
        if running == 0:
            break
        time.sleep(0.1)
    assert running == 0
    r2 = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8)
    assert r2.choices[0].message.content


def test_server_log_holds_no_patient_text(server: Server, client: openai.OpenAI) -> None:
    client.chat.completions.create(model=MODEL, messages=SECRET_MESSAGES, max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=SECRET_MESSAGES, temperature=9)
    # Access lines are written as responses finish: wait (bounded) for a marker request's.
    marker = httpx.get(f"{server.url}/health", timeout=5).headers["x-request-id"]
    deadline = time.monotonic() + 10
    log = ""
    while marker not in log and time.monotonic() < deadline:
        time.sleep(0.05)
        log = server.log.read_text()
    assert marker in log
    assert '"route": "/v1/chat/completions"' in log
    assert SECRET not in log


def test_bench_cli_against_the_server(server: Server) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "medserve",
            "bench",
            "--url",
            server.url,
            "--concurrency",
            "4",
            "--requests",
            "8",
            "--max-tokens",
            "8",
            "--stream",
            "--json",
            "--time-limit",
            "120",
            "--api-key",
            DEV_KEY,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    report = json.loads(out.stdout)
    assert (report["completed"], report["errors"]) == (8, {})
    assert 0 < report["output_tokens"] <= 64
    assert report["ttft_s"]["p50"] > 0


def test_the_whole_session_made_no_outbound_attempt(server: Server) -> None:
    """Last in this module: after every test above used the server, its egress guard
    (which refuses and counts any non-loopback connect or lookup) has refused nothing,
    and its audit log verifies."""
    page = httpx.get(f"{server.url}/metrics").text
    assert "medserve_egress_refusals_total 0.0" in page
    assert "egress refused" not in server.log.read_text()
    db = server.log.parent / "audit" / "audit.db"
    cmd = [sys.executable, "-m", "medserve", "audit", "verify", "--db", str(db)]
    assert subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0
