"""The vLLM relay end to end: `medserve serve` with two remote vllm replicas (two fake
upstreams; the router asks the first while both are idle).

- A client that leaves closes the upstream request at every stage, streaming or not:
  while the upstream has not answered (no headers), before its first event, mid-stream,
  and while a non-streaming answer is being drained. The upstream sees the client leave,
  the request is audited as 499 and it is never taken to the other replica. (There is no
  "queued in medserve" stage for vLLM: the router refuses a full replica with 503 +
  Retry-After and vLLM queues what it admits; leaving while vLLM queues is "before its
  first event".)
- After the commit point nothing is retried: a dropped connection or a stall mid-stream
  ends the answer with an error, and only one upstream request was made; a tool call's
  first piece is such a point too.
- The upstream's exact usage reaches the audit record and the metrics, with the client's
  include_usage on or off, whichever shape of usage chunk the upstream sends.
- Extra delta fields (vLLM's reasoning_content) reach the client, streaming or not.
- A model with ``cache_isolation = "key"`` (a second model on replica 1) sends the key's
  id upstream as vLLM's ``cache_salt``; the shared one sends none.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from medserve.audit.keys import ChainKeys, load_or_create_secret
from tests.conftest import AUTH
from tests.fakeupstream import FakeUpstream, Knobs, Seen, running_upstream
from tests.serverproc import Server, running_server
from tests.sse import DONE, events

pytestmark = pytest.mark.e2e
MODEL = "med-gpu"
KEYED = "med-gpu-keyed"  # the same upstream as replica 1, prefix cache isolated per key
TEXT = "Asthma causes wheezing and ünusual breathlessness at night"
QUESTION = "Name one symptom"
PROMPT_TOKENS = len(f"user: {QUESTION}".split()) + 1  # the fake's chat prompt, one token a word
WAIT_S = 30.0  # bound on every wait for the upstream, the audit log and the metrics
READ_TIMEOUT_S = 2  # replica 0's longest pause between reads once streaming


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[FakeUpstream, FakeUpstream]]:
    with running_upstream() as a, running_upstream() as b:
        yield a, b


@pytest.fixture(scope="module")
def server(
    pair: tuple[FakeUpstream, FakeUpstream], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("relay")
    replica = '[[models.replicas]]\nengine = "vllm"\nurl = "{}"\nserved_model_name = "m"\n'
    config = base / "relay.toml"
    config.write_text(
        f'[[models]]\nid = "{MODEL}"\n'
        + replica.format(pair[0].url)
        + f"first_event_timeout_s = 60\nread_timeout_s = {READ_TIMEOUT_S}\n"
        + replica.format(pair[1].url)
        # Replica 0 first while both are idle; the many injected faults never open a
        # breaker (the breaker has its own tests: tests/e2e/test_replica_health.py).
        + '[models.routing]\nbalance = "ordered"\nbreaker_faults = 1000\nbusy_s = 0\n'
        + f'[[models]]\nid = "{KEYED}"\ncache_isolation = "key"\n'
        + replica.format(pair[1].url)
    )
    with running_server(base / "medserve.log", "-c", str(config)) as s:
        yield s


@pytest.fixture
def fresh(pair: tuple[FakeUpstream, FakeUpstream]) -> tuple[FakeUpstream, FakeUpstream]:
    a, b = pair
    a.knobs, b.knobs = Knobs(text=TEXT), Knobs(text=TEXT)
    a.seen.clear()
    b.seen.clear()
    return a, b


def chat(stream: bool, **fields: Any) -> dict[str, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}]}
    return {**body, "max_tokens": 64, "stream": stream, **fields}


def until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` until true, at most WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {WAIT_S} s")
        time.sleep(0.02)


def request_id(seen: Seen) -> str:
    """The exchange's id: the upstream's X-Request-Id is it plus a per-attempt suffix."""
    return seen.headers["x-request-id"].rsplit("-", 1)[0]


# --- cancellation at every stage -------------------------------------------------------

# Long enough that an upstream whose client left unnoticed is still busy after WAIT_S: a
# token every 0.5 s (below replica 0's read timeout, so medserve never gives up itself).
SLOW = Knobs(text=" ".join(f"w{i}" for i in range(200)), token_delay_s=0.5)
STAGES: dict[str, tuple[Knobs, Callable[[Seen], bool]]] = {
    # stage: (the upstream's behaviour, when the request has reached that stage)
    "before-headers": (Knobs(stall_before_headers_s=60), lambda s: s.stalled.is_set()),
    "first-event": (Knobs(ttft_s=60), lambda s: s.stalled.is_set()),
    "mid-stream": (SLOW, lambda s: s.sent >= 2),
}
CANCEL_CASES = [
    ("before-headers", True),
    ("before-headers", False),
    ("first-event", True),
    ("first-event", False),
    ("mid-stream", True),  # streaming: the client has read content too
    ("mid-stream", False),  # not streaming: medserve is draining the answer
]


async def leave_at(
    server: Server, upstream: FakeUpstream, stream: bool, reached: Callable[[Seen], bool]
) -> None:
    """Ask, wait until the upstream's request has ``reached`` the stage (streaming past
    the commit point: and the client read a content delta), then leave: cancelling the
    task closes the connection."""
    content = asyncio.Event()
    body = chat(stream, max_tokens=200)

    async def ask(client: httpx.AsyncClient) -> None:
        url = f"{server.url}/v1/chat/completions"
        async with client.stream("POST", url, json=body, headers=AUTH) as r:
            async for line in r.aiter_lines():
                event = json.loads(line[6:]) if line.startswith("data: {") else {}
                if any(c["delta"].get("content") for c in event.get("choices", [])):
                    content.set()

    async with httpx.AsyncClient(timeout=120) as client:
        task = asyncio.create_task(ask(client))
        async with asyncio.timeout(WAIT_S):
            while not (upstream.seen and reached(upstream.seen[-1])):
                assert not task.done(), "the request ended before reaching the stage"
                await asyncio.sleep(0.02)
            if stream and upstream.seen[-1].sent:
                await content.wait()
        assert not task.done()
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


@pytest.mark.parametrize(("stage", "stream"), CANCEL_CASES)
def test_a_client_that_leaves_closes_the_upstream_at_every_stage(
    server: Server, fresh: tuple[FakeUpstream, FakeUpstream], stage: str, stream: bool
) -> None:
    a, b = fresh
    a.knobs, reached = STAGES[stage]
    asyncio.run(leave_at(server, a, stream, reached))
    assert len(a.seen) == 1
    assert a.seen[0].left.wait(WAIT_S), "the upstream never saw the client leave"
    facts = server.audit_record(request_id(a.seen[0]))
    assert (facts["status"], facts["stream"], facts["attempts"]) == (499, stream, 1)
    assert b.seen == []  # a client that leaves is not a replica fault: no failover


# --- no retry after the commit point ---------------------------------------------------

AFTER_COMMIT = {
    "dropped": (Knobs(text=TEXT, drop_after=2), "engine_error", 500),
    "stalled": (Knobs(text=TEXT, stall_after=2), "timeout", 504),
}


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "non-streaming"])
@pytest.mark.parametrize("fault", list(AFTER_COMMIT))
def test_a_fault_after_the_first_tokens_is_the_answer_and_never_retried(
    server: Server, fresh: tuple[FakeUpstream, FakeUpstream], fault: str, stream: bool
) -> None:
    a, b = fresh
    a.knobs, code, status = AFTER_COMMIT[fault]
    r = httpx.post(f"{server.url}/v1/chat/completions", json=chat(stream), headers=AUTH, timeout=60)
    if stream:
        assert r.status_code == 200
        sent = events(r.text)
        assert DONE not in sent
        assert sent[-1]["error"]["code"] == code
        content = "".join(e["choices"][0]["delta"].get("content", "") for e in sent[:-1])
        assert content == " ".join(TEXT.split()[:2])  # what came before the fault
    else:
        assert r.status_code == status
        assert r.json()["error"]["code"] == code
    assert (len(a.seen), len(b.seen)) == (1, 0)
    facts = server.audit_record(r.headers["x-request-id"])
    assert (facts["attempts"], facts["finish_reason"], facts["error"]) == (1, None, code)


# A tool call's first piece (its id and name) commits the answer like text: a fault
# after it is the answer, never a retry on the other replica.
CALL_PIECES = [
    {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}},
    {"index": 0, "function": {"arguments": '{"a": 1}'}},
]


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "non-streaming"])
def test_a_fault_after_a_tool_call_piece_is_never_retried(
    server: Server, fresh: tuple[FakeUpstream, FakeUpstream], stream: bool
) -> None:
    a, b = fresh
    a.knobs = Knobs(text="", tool_calls=CALL_PIECES, drop_after=1)
    r = httpx.post(f"{server.url}/v1/chat/completions", json=chat(stream), headers=AUTH, timeout=60)
    if stream:
        assert r.status_code == 200
        sent = events(r.text)
        assert DONE not in sent and sent[-1]["error"]["code"] == "engine_error"
    else:
        assert (r.status_code, r.json()["error"]["code"]) == (500, "engine_error")
    assert (len(a.seen), len(b.seen)) == (1, 0)
    facts = server.audit_record(r.headers["x-request-id"])
    assert (facts["attempts"], facts["error"]) == (1, "engine_error")


# --- exact usage in the audit record and the metrics -----------------------------------


def tokens(server: Server) -> tuple[float, float]:
    """medserve's (prompt, generation) token counters for MODEL."""
    page = httpx.get(f"{server.url}/metrics", headers=AUTH, timeout=30).text
    found = {"medserve_prompt_tokens": 0.0, "medserve_generation_tokens": 0.0}
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            name = sample.name.removesuffix("_total")
            if name in found and sample.labels.get("model") == MODEL:
                found[name] = sample.value
    return found["medserve_prompt_tokens"], found["medserve_generation_tokens"]


USAGE_CASES = [
    # (stream, include_usage): the client's choice; the upstream is always asked for usage
    (True, True),
    (True, False),
    (False, None),
]


@pytest.mark.parametrize("usage_in_last", [False, True], ids=["usage-chunk", "usage-on-last"])
@pytest.mark.parametrize(("stream", "include_usage"), USAGE_CASES)
def test_usage_is_the_upstreams_exactly_in_audit_and_metrics(
    server: Server,
    fresh: tuple[FakeUpstream, FakeUpstream],
    stream: bool,
    include_usage: bool | None,
    usage_in_last: bool,
) -> None:
    a, _ = fresh
    # Reasoning tokens are generated tokens without content: counting content deltas
    # instead of taking the upstream's usage would miss them.
    a.knobs = Knobs(text=TEXT, reasoning="let me think", usage_in_last=usage_in_last)
    generated = len(TEXT.split()) + 3
    before = tokens(server)
    options = {} if include_usage is None else {"stream_options": {"include_usage": include_usage}}
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json=chat(stream, **options),
        headers=AUTH,
        timeout=60,
    )
    assert r.status_code == 200
    usage = {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": generated,
        "total_tokens": PROMPT_TOKENS + generated,
    }
    if stream:
        sent = events(r.text)
        assert sent[-1] == DONE
        given = [e["usage"] for e in sent[:-1] if e.get("usage")]
        assert given == ([usage] if include_usage else [])
    else:
        assert r.json()["usage"] == usage
    facts = server.audit_record(r.headers["x-request-id"])
    assert (facts["prompt_tokens"], facts["completion_tokens"]) == (PROMPT_TOKENS, generated)
    expected = (before[0] + PROMPT_TOKENS, before[1] + generated)
    until(lambda: tokens(server) != before, "the token counters to move")
    assert tokens(server) == expected


# --- extra delta fields ----------------------------------------------------------------


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "non-streaming"])
def test_reasoning_and_unknown_delta_fields_reach_the_client(
    server: Server, fresh: tuple[FakeUpstream, FakeUpstream], stream: bool, field: str
) -> None:
    a, _ = fresh
    a.knobs = Knobs(
        text="a b", reasoning="think it over", reasoning_field=field, delta_extra={"x-new": 1}
    )
    r = httpx.post(f"{server.url}/v1/chat/completions", json=chat(stream), headers=AUTH, timeout=60)
    assert r.status_code == 200
    # Everything the client received is in the audit record's completion hash: the text
    # and the other message fields, as one JSON object with sorted keys.
    answer = {"content": "a b", field: "think it over", "x-new": 1}
    audited = json.dumps(answer, sort_keys=True, ensure_ascii=False).encode()
    keys = ChainKeys.from_secret(load_or_create_secret(server.log.parent / "audit" / "audit.key"))
    rec = server.audit_record(request_id(a.seen[-1]))
    assert rec["completion_hmac"] == keys.text_hmac(audited)
    if not stream:
        message = r.json()["choices"][0]["message"]
        assert (message["content"], message[field], message["x-new"]) == ("a b", "think it over", 1)
        return
    sent = events(r.text)
    deltas = [e["choices"][0]["delta"] for e in sent[:-1] if e["choices"]]
    assert deltas == [
        {"role": "assistant", "content": ""},
        {field: "think"},
        {field: " it"},
        {field: " over"},
        {"content": "a", "x-new": 1},
        {"content": " b", "x-new": 1},
        {},
    ]


# --- prefix cache isolation -------------------------------------------------------------


@pytest.mark.parametrize(("model", "salt"), [(MODEL, None), (KEYED, "dev")], ids=["shared", "key"])
def test_the_keys_id_goes_upstream_as_cache_salt_only_when_isolated(
    server: Server, fresh: tuple[FakeUpstream, FakeUpstream], model: str, salt: str | None
) -> None:
    """The dev key's id is ``dev``: with ``cache_isolation = "key"`` vLLM gets it as
    ``cache_salt`` (its prefix cache then reuses blocks only within the key)."""
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json=chat(False, model=model),
        headers=AUTH,
        timeout=60,
    )
    assert r.status_code == 200, r.text
    (seen,) = (*fresh[0].seen, *fresh[1].seen)  # generation requests only
    assert seen.body.get("cache_salt") == salt
