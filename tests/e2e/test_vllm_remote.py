"""End to end: `medserve serve` with a remote vllm replica (the fake OpenAI upstream),
driven by the official openai client: chat, stream, completions with exact usage; the
client's credentials and headers never reach the upstream. (Cancellation at every stage,
no retry after the commit point, usage in audit and metrics: test_vllm_relay.py.)"""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.conftest import DEV_KEY
from tests.fakeupstream import FakeUpstream, Knobs, running_upstream
from tests.serverproc import Server, running_server

pytestmark = pytest.mark.e2e
MODEL = "med-gpu"
TEXT = "Asthma causes wheezing ✓ and ünusual breathlessness"
# What medserve sends upstream: the allow-list plus what HTTP itself needs (httpx's own).
UPSTREAM_HEADERS = {
    "host",
    "accept",
    "accept-encoding",
    "connection",
    "user-agent",
    "content-type",
    "content-length",
    "authorization",
    "x-request-id",
}


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with running_upstream() as server:
        yield server


@pytest.fixture(scope="module")
def server(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("vllm")
    config = base / "vllm.toml"
    config.write_text(
        f'[[models]]\nid = "{MODEL}"\n[[models.replicas]]\nengine = "vllm"\n'
        f'url = "{upstream.url}"\nserved_model_name = "m"\napi_key = "replica-key"\n'
        "first_event_timeout_s = 60\n"
    )
    with running_server(base / "medserve.log", "-c", str(config)) as s:
        yield s


@pytest.fixture
def client(server: Server, upstream: FakeUpstream) -> Iterator[openai.OpenAI]:
    upstream.knobs = Knobs(text=TEXT)
    extra = {
        "Cookie": "session=client-secret",
        "X-Api-Key": "client-secret",
        "X-Request-Id": "client-secret-request-id",
        "X-Forwarded-For": "10.0.0.1",
    }
    with openai.OpenAI(
        base_url=f"{server.url}/v1",
        api_key=DEV_KEY,
        max_retries=0,
        timeout=60,
        default_headers=extra,
    ) as c:
        yield c


def test_chat_stream_and_completions_with_exact_usage(
    client: openai.OpenAI, upstream: FakeUpstream
) -> None:
    words = len(TEXT.split())
    question = "Name one symptom of asthma"
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=20
    )
    assert r.choices[0].message.content == TEXT and r.choices[0].finish_reason == "stop"
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(question.split()) + 2, words)

    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": question}],
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, usage = [], None
    for chunk in stream:
        parts += [c.delta.content or "" for c in chunk.choices]
        usage = chunk.usage or usage
    assert "".join(parts) == TEXT
    assert usage is not None and usage.completion_tokens == words

    c = client.completions.create(model=MODEL, prompt="one two three", max_tokens=20)
    assert c.choices[0].text == TEXT and c.usage is not None
    assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (3, words)

    for seen in upstream.seen[-3:]:  # the replica's key only, never the client's
        assert seen.headers["authorization"] == "Bearer replica-key"
        assert "cookie" not in seen.headers and "x-api-key" not in seen.headers
        assert DEV_KEY not in str(seen.headers) and "client-secret" not in str(seen.headers)
        assert set(seen.headers) <= UPSTREAM_HEADERS  # nothing else of the client's either


def test_models_lists_the_vllm_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
