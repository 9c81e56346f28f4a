"""Real vLLM (CPU build) as a remote replica behind `medserve serve`, driven by the
official openai client: chat, streams with and without the usage chunk, completions, a
context overflow as medserve's own 400, vLLM's /metrics names, abort on client disconnect,
and no connect() or bind() of vLLM's process tree off loopback. Through medserve's vllm
engine (engine level): a json_schema constraint gives an answer that validates, and
vLLM's logprobs come back one per token.

One vLLM server for the module (start-up is slow), traced with strace when it can be.
The tiny model is random, and greedy decoding never picks EOS (its logit is fixed at 0),
so every greedy request runs to exactly ``max_tokens`` and its text is reproducible: what
comes through medserve is compared with what vLLM answers directly.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import math
import os
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from medserve.engines.base import (
    Constraint,
    GenerationChunk,
    GenerationRequest,
    Message,
    Sampling,
)
from medserve.engines.vllm import VllmEngine, VllmSpec
from tests.conftest import AUTH, DEV_KEY, SECRET, flat_spec
from tests.serverproc import Server, running_server
from tests.vllm.conftest import VLLM_MARKS
from tests.vllm.vllmproc import (
    GREEDY,
    MAX_MODEL_LEN,
    SERVED_NAME,
    UPSTREAM_EXTRAS,
    Proc,
    VllmServer,
    descendants,
    gauge,
    inet_sockets,
    loopback,
    off_loopback,
    remote_config,
    running_vllm,
    scrape,
    traced_inet_calls,
    wait_for,
)

pytestmark = VLLM_MARKS
MODEL = "tiny-med"
QUESTION = "Which symptoms point to asthma?"
LONG = MAX_MODEL_LEN - 100  # tokens: minutes of decoding on CPU, if nothing aborts it


@pytest.fixture(scope="module")
def vllm(
    vllm_python: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VllmServer]:
    # No prefix cache: a cached prefix changes the prefill's shapes, and with random
    # weights that can flip a near-tie, so direct and relayed greedy runs could differ.
    # MEDSERVE_VLLM_STRACE=0: no strace (the network check reads /proc instead).
    trace = os.environ.get("MEDSERVE_VLLM_STRACE", "1") != "0"
    home = tmp_path_factory.mktemp("vllm-remote")
    # Compact JSON under a schema: with random weights, greedy decoding under xgrammar's
    # default (any whitespace between JSON tokens) can pick whitespace forever. (vLLM
    # takes disable_any_whitespace only with the backend named: xgrammar, its default.)
    args = [
        "--no-enable-prefix-caching",
        "--structured-outputs-config",
        json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}),
    ]
    with running_vllm(vllm_python, tiny_model, home, args, trace=trace) as server:
        yield server


@pytest.fixture(scope="module")
def server(vllm: VllmServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("medserve-remote")
    config = remote_config(base / "models.toml", MODEL, vllm.url)
    with running_server(base / "medserve.log", "-c", str(config)) as s:
        yield s


@pytest.fixture
def client(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{server.url}/v1", api_key=DEV_KEY, max_retries=0, timeout=120
    ) as c:
        yield c


@pytest.fixture
def direct(vllm: VllmServer) -> Iterator[openai.OpenAI]:
    """The same vLLM server without medserve in between (the reference)."""
    with openai.OpenAI(
        base_url=f"{vllm.url}/v1", api_key="unused", max_retries=0, timeout=120
    ) as c:
        yield c


def messages(text: str = QUESTION) -> list[Any]:
    return [{"role": "user", "content": text}]


def test_chat_through_medserve_is_vllms_own_answer(
    client: openai.OpenAI, direct: openai.OpenAI
) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    ours = client.chat.completions.create(model=MODEL, messages=messages(), max_tokens=12, **GREEDY)
    theirs = direct.chat.completions.create(
        model=SERVED_NAME, messages=messages(), max_tokens=12, **GREEDY, extra_body=UPSTREAM_EXTRAS
    )
    assert ours.model == MODEL
    assert ours.choices[0].finish_reason == "length"
    assert ours.choices[0].message.content == theirs.choices[0].message.content
    assert ours.usage is not None and theirs.usage is not None
    assert ours.usage.completion_tokens == 12
    assert ours.usage.prompt_tokens == theirs.usage.prompt_tokens > len(QUESTION.split())


@pytest.mark.parametrize("include_usage", [True, False], ids=["usage", "no-usage"])
def test_chat_stream_has_a_usage_chunk_only_when_asked(
    client: openai.OpenAI, direct: openai.OpenAI, include_usage: bool
) -> None:
    whole = direct.chat.completions.create(
        model=SERVED_NAME, messages=messages(), max_tokens=16, **GREEDY, extra_body=UPSTREAM_EXTRAS
    )
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages(),
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": include_usage},
        **GREEDY,
    )
    chunks = list(stream)
    text = "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices)
    finishes = [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason]
    assert text == whole.choices[0].message.content
    assert finishes == ["length"]
    with_usage = [chunk for chunk in chunks if chunk.usage is not None]
    if not include_usage:
        assert with_usage == []
        return
    assert with_usage == [chunks[-1]] and chunks[-1].choices == []
    usage, expected = chunks[-1].usage, whole.usage
    assert usage is not None and expected is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (expected.prompt_tokens, 16)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_completions_through_medserve_are_vllms_own(
    client: openai.OpenAI, direct: openai.OpenAI, stream: bool
) -> None:
    prompt = "The patient reports"
    theirs = direct.completions.create(
        model=SERVED_NAME, prompt=prompt, max_tokens=10, **GREEDY, extra_body=UPSTREAM_EXTRAS
    )
    assert theirs.usage is not None
    if stream:
        chunks = list(
            client.completions.create(
                model=MODEL,
                prompt=prompt,
                max_tokens=10,
                stream=True,
                stream_options={"include_usage": True},
                **GREEDY,
            )
        )
        text = "".join(c.text for chunk in chunks for c in chunk.choices)
        usage = chunks[-1].usage
    else:
        whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, **GREEDY)
        assert whole.choices[0].finish_reason == "length"
        text, usage = whole.choices[0].text, whole.usage
    assert text == theirs.choices[0].text
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (theirs.usage.prompt_tokens, 10)


@pytest.mark.parametrize(
    ("path", "body", "param", "by_vllm"),
    [
        # About 4 characters per token here: far more than the context. No budget: vLLM
        # itself refuses the prompt.
        ("/v1/chat/completions", {"messages": messages(f"{SECRET} " * 6000)}, "messages", True),
        # With a budget medserve counts the prompt with vLLM's /tokenize first.
        ("/v1/completions", {"prompt": f"{SECRET} " * 6000, "max_tokens": 5}, "prompt", False),
        (
            "/v1/chat/completions",
            {"messages": messages(SECRET), "max_tokens": MAX_MODEL_LEN + 1},
            "max_tokens",
            False,
        ),
        # A budget that fits alone but not after the prompt: vLLM 0.32 would take it and
        # cut the answer at the window without saying so.
        (
            "/v1/chat/completions",
            {"messages": messages(SECRET), "max_tokens": MAX_MODEL_LEN - 5},
            "max_tokens",
            False,
        ),
    ],
    ids=["chat-prompt", "completion-prompt", "max-tokens", "prompt-plus-budget"],
)
def test_vllms_context_overflow_is_medserves_400(
    server: Server,
    vllm: VllmServer,
    path: str,
    body: dict[str, Any],
    param: str,
    by_vllm: bool,
) -> None:
    before = server.log.read_text()
    r = httpx.post(f"{server.url}{path}", json={"model": MODEL, **body}, headers=AUTH, timeout=120)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "context_length_exceeded",
        param,
    )
    assert f"{MAX_MODEL_LEN} tokens" in error["message"]
    for leak in (SECRET, str(vllm.port), "127.0.0.1"):
        assert leak not in r.text
    # Who refused it: vLLM's generation endpoint (a 400 in medserve's log), or medserve
    # from vLLM's own token count before asking for a generation.
    refusals = [
        json.loads(line)
        for line in server.log.read_text()[len(before) :].splitlines()
        if '"vllm replica refused"' in line
    ]
    assert [entry["status"] for entry in refusals] == ([400] if by_vllm else [])


def test_vllm_metrics_have_the_names_medserve_scrapes(vllm: VllmServer) -> None:
    metrics = scrape(vllm.url)
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running"):
        assert metrics[name][0] == "gauge"
    assert metrics["vllm:kv_cache_usage_perc"][0] == "gauge"
    assert 0.0 <= metrics["vllm:kv_cache_usage_perc"][1] <= 1.0
    assert metrics["vllm:generation_tokens"][0] == "counter"


def generated(vllm: VllmServer) -> float:
    return scrape(vllm.url)["vllm:generation_tokens"][1]


def running(vllm: VllmServer) -> float:
    return gauge(vllm.url, "vllm:num_requests_running")


def test_a_client_that_leaves_mid_stream_aborts_the_request_in_vllm(
    client: openai.OpenAI, vllm: VllmServer
) -> None:
    wait_for(lambda: running(vllm) == 0, 60, "vLLM idle before the test")
    before = generated(vllm)
    stream = client.chat.completions.create(
        model=MODEL, messages=messages(), max_tokens=LONG, stream=True, **GREEDY
    )
    for seen, _ in enumerate(stream):  # the request is committed and streaming
        if seen == 5:
            break
    wait_for(lambda: running(vllm) == 1, 30, "the request running in vLLM")
    stream.close()
    # Left alone, the request would decode LONG tokens (minutes here); aborted, it stops.
    wait_for(lambda: running(vllm) == 0, 60, "vLLM aborted the request")
    assert generated(vllm) - before < LONG / 2


def test_a_client_that_stops_waiting_for_a_whole_answer_aborts_it_in_vllm(
    server: Server, vllm: VllmServer
) -> None:
    wait_for(lambda: running(vllm) == 0, 60, "vLLM idle before the test")
    before = generated(vllm)
    outcome: list[BaseException] = []

    def ask() -> None:
        body = {"model": MODEL, "messages": messages(), "max_tokens": LONG, **GREEDY}
        try:
            httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=15)
        except httpx.ReadTimeout as exc:  # the client gives up and closes the connection
            outcome.append(exc)

    asker = threading.Thread(target=ask)
    asker.start()
    wait_for(lambda: running(vllm) == 1 or not asker.is_alive(), 30, "the request in vLLM")
    assert asker.is_alive(), "the request ended before it was seen running"
    asker.join(timeout=60)
    assert not asker.is_alive() and len(outcome) == 1
    wait_for(lambda: running(vllm) == 0, 60, "vLLM aborted the request")
    assert generated(vllm) - before < LONG / 2


def test_no_connect_or_bind_of_vllm_leaves_loopback(
    client: openai.OpenAI, vllm: VllmServer
) -> None:
    """Everything vLLM's process tree connected to or bound, since its start, was on
    loopback (strace's record of connect()/bind(); without strace, the TCP/UDP sockets
    its processes hold open right after a request)."""
    client.chat.completions.create(model=MODEL, messages=messages(), max_tokens=4, **GREEDY)
    if vllm.trace is None:
        root = Proc.of(vllm.process.pid)
        tree = [*([root] if root else []), *descendants(vllm.process.pid)]
        sockets = inet_sockets(tree)
        assert any(local == "127.0.0.1" for _, local, _ in sockets)  # the HTTP listener
        assert off_loopback(sockets) == []
        return
    calls = traced_inet_calls(vllm.trace.read_text())
    # The record is complete enough to mean something: the HTTP listener's bind, and
    # calls from more processes than the API server (EngineCore, Worker).
    assert any(call == "bind" and f"htons({vllm.port})" in line for call, _, line in calls), (
        "strace did not record the HTTP listener's bind"
    )
    assert len({line.split()[0] for _, _, line in calls}) >= 2
    assert [line for _, address, line in calls if not loopback(address)] == []


# One code from a closed list inside nested single-property objects and a one-item array:
# a finite language (no comma, where xgrammar 0.2.8 may still put whitespace), so the
# random model's greedy answer closes the JSON and then can only end (EOS).
ICD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["diagnoses"],
    "properties": {
        "diagnoses": {
            "type": "array",
            "minItems": 1,
            "maxItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["code"],
                "properties": {"code": {"enum": ["J45", "R06.2", "I10"]}},
            },
        }
    },
}


def validate(instance: object, schema: dict[str, Any], vllm_python: Path) -> None:
    """jsonschema's verdict: imported here when the project venv has it, else run in
    vLLM's venv (vLLM depends on it)."""
    try:
        jsonschema = importlib.import_module("jsonschema")
    except ImportError:
        code = "import json, sys, jsonschema; jsonschema.validate(*map(json.loads, sys.argv[1:]))"
        args = [json.dumps(instance), json.dumps(schema)]
        done = subprocess.run(
            [str(vllm_python), "-c", code, *args], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return
    jsonschema.validate(instance, schema)


def greedy(max_tokens: int) -> Sampling:
    """Greedy sampling with nothing else on: the raw distribution's argmax every step."""
    return Sampling(
        max_tokens=max_tokens,
        temperature=0.0,
        top_p=1.0,
        top_k=0,
        min_p=0.0,
        repeat_penalty=1.0,
        frequency_penalty=0.0,
        presence_penalty=0.0,
        seed=0,
    )


def through_engine(vllm: VllmServer, *requests: GenerationRequest) -> list[list[GenerationChunk]]:
    """Each request's chunks from medserve's vllm engine on this server, one at a time."""
    spec = VllmSpec(engine="vllm", url=vllm.url, served_model_name=SERVED_NAME)

    async def ask() -> list[list[GenerationChunk]]:
        engine = VllmEngine(flat_spec(id=MODEL, engine="fake"), spec)
        await engine.start()
        try:
            return [[chunk async for chunk in engine.generate(r)] for r in requests]
        finally:
            await engine.close()

    return asyncio.run(ask())


def test_a_json_schema_answer_from_vllm_validates(vllm: VllmServer, vllm_python: Path) -> None:
    """A json_schema constraint through medserve's vllm engine: vLLM's structured outputs
    (xgrammar on CPU) enforce it, and the relayed text parses and validates."""
    text = json.dumps(ICD_SCHEMA, sort_keys=True, separators=(",", ":"))
    constraint = Constraint(
        "json_schema", text, hashlib.sha256(text.encode()).hexdigest(), "icd", strict=True
    )
    request = GenerationRequest(
        "json-1",
        MODEL,
        greedy(64),
        messages=(Message("user", QUESTION),),
        constraint=constraint,
    )
    (*body, last), free = through_engine(vllm, request, replace(request, constraint=None))
    answer = "".join(chunk.text for chunk in body)
    assert last.finish_reason == "stop", answer  # the grammar closed the JSON, then EOS
    parsed = json.loads(answer)
    validate(parsed, ICD_SCHEMA, vllm_python)
    assert parsed["diagnoses"][0]["code"] in ("J45", "R06.2", "I10")
    # The constraint did it: the same greedy request without it is no JSON (random
    # weights; it runs to max_tokens since greedy never picks EOS here).
    assert free[-1].finish_reason == "length"
    assert not "".join(chunk.text for chunk in free).lstrip().startswith('{"diagnoses"')


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_logprobs_from_vllm_come_back_one_per_token(vllm: VllmServer, chat: bool) -> None:
    """vLLM's own logprobs shapes (chat entries with bytes; completions' legacy lists)
    parse into one TokenLogprob per generated token; greedy's token is the most likely."""
    fields: dict[str, Any] = (
        {"messages": (Message("user", QUESTION),)} if chat else {"prompt": "The patient"}
    )
    request = GenerationRequest("lp-1", MODEL, greedy(8), logprobs=3, **fields)
    ((*body, last),) = through_engine(vllm, request)
    entries = [entry for chunk in body for entry in chunk.logprobs]
    assert last.finish_reason == "length" and len(entries) == last.completion_tokens == 8
    for entry in entries:
        # Completions' alternatives are a dict keyed by token text: the sampled token is
        # in it (so up to 4), and tokens that decode alike share one key.
        assert 1 <= len(entry.top) <= (3 if chat else 4)
        values = [alternative.logprob for alternative in entry.top]
        assert values == sorted(values, reverse=True)
        assert values[0] <= entry.logprob + 1e-4  # greedy took the raw argmax
        if chat:
            assert len(entry.top) == 3 and values[0] == pytest.approx(entry.logprob, abs=1e-4)
        assert sum(math.exp(v) for v in values) <= 1 + 1e-3
        assert entry.logprob <= 0
