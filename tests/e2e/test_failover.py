"""Failover before the commit point: a model with two remote vllm replicas (two fake
upstreams). A replica fault before the first chunk (503, 500, an error event, no first
event in time, a closed port) moves the request to the other replica, streaming or not;
a client error (400) never does; after the first chunk nothing is switched."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import AUTH, DEV_KEY
from tests.fakeupstream import FakeUpstream, Knobs, running_upstream
from tests.serverproc import Server, running_server

pytestmark = pytest.mark.e2e
MODEL = "med-gpu"
TEXT = "Asthma causes wheezing and breathlessness"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "symptom?"}], "max_tokens": 20}
WAIT_S = 30.0  # bound on polling the audit log


# The first replica is asked first when both are idle (``ordered``), and the faults these
# tests inject one after the other never open its breaker nor mark it busy: each test
# starts from the same routing state. The breaker itself: tests/e2e/test_replica_health.py.
ROUTING = 'balance = "ordered"\nbreaker_faults = 1000\nbusy_s = 0\n'


def config(
    path: Path,
    first: FakeUpstream | str,
    second: FakeUpstream,
    *,
    model: str = "",
    first_keys: str = "",
    second_keys: str = "",
    routing: str = ROUTING,
) -> Path:
    """Two replicas of MODEL: ``first`` (gives up on a first event after 1 s), ``second``
    (after 60 s). ``model``, ``first_keys``, ``second_keys``, ``routing``: more TOML for
    the model, each replica and ``[models.routing]``."""
    url = first if isinstance(first, str) else first.url
    replica = '[[models.replicas]]\nengine = "vllm"\nurl = "{}"\nserved_model_name = "m"\n'
    path.write_text(
        f'[[models]]\nid = "{MODEL}"\n{model}'
        + replica.format(url)
        + f"first_event_timeout_s = 1\nhealth_ttl_s = 0\n{first_keys}"
        + replica.format(second.url)
        + f"first_event_timeout_s = 60\nhealth_ttl_s = 0\n{second_keys}"
        + f"[models.routing]\n{routing}"
    )
    return path


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[FakeUpstream, FakeUpstream]]:
    with running_upstream() as a, running_upstream() as b:
        yield a, b


@pytest.fixture(scope="module")
def server(
    pair: tuple[FakeUpstream, FakeUpstream], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("failover")
    with running_server(base / "medserve.log", "-c", str(config(base / "m.toml", *pair))) as s:
        yield s


@pytest.fixture
def fresh(pair: tuple[FakeUpstream, FakeUpstream]) -> tuple[FakeUpstream, FakeUpstream]:
    a, b = pair
    a.knobs, b.knobs = Knobs(text=TEXT), Knobs(text=TEXT)
    a.seen.clear()
    b.seen.clear()
    return a, b


def post(server: Server, stream: bool, body: dict[str, object] = CHAT) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/chat/completions",
        json={**body, "stream": stream},
        headers=AUTH,
        timeout=60,
    )


def answer(r: httpx.Response, stream: bool) -> str:
    """The generated text, streaming or not (a stream must end with [DONE])."""
    if not stream:
        return str(r.json()["choices"][0]["message"]["content"])
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    deltas = [json.loads(e)["choices"] for e in events[:-1]]
    return "".join(c[0]["delta"].get("content") or "" for c in deltas if c)


FAULTS = {
    "503": Knobs(status=503, retry_after="1"),
    "500": Knobs(status=500),
    "error-event": Knobs(error_after=0),
    "first-event-timeout": Knobs(ttft_s=30),
}


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "non-streaming"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_replica_fault_before_the_first_chunk_fails_over(
    server: Server, fresh: tuple[FakeUpstream, FakeUpstream], fault: str, stream: bool
) -> None:
    a, b = fresh
    a.knobs = FAULTS[fault]
    r = post(server, stream)
    assert r.status_code == 200
    assert answer(r, stream) == TEXT
    assert (len(a.seen), len(b.seen)) == (1, 1)
    facts = server.audit_record(r.headers["x-request-id"])
    assert (facts["attempts"], facts["replica"], facts["status"]) == (2, "vllm:1", 200)


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "non-streaming"])
def test_a_client_error_never_fails_over(
    server: Server, fresh: tuple[FakeUpstream, FakeUpstream], stream: bool
) -> None:
    a, b = fresh
    a.knobs = Knobs(status=400)
    r = post(server, stream)
    assert r.status_code == 400
    assert (len(a.seen), len(b.seen)) == (1, 0)


@pytest.mark.parametrize(
    ("second", "status"), [(Knobs(status=503, retry_after="7"), 503), (Knobs(status=500), 500)]
)
def test_every_replica_failing_answers_the_last_fault(
    server: Server, fresh: tuple[FakeUpstream, FakeUpstream], second: Knobs, status: int
) -> None:
    a, b = fresh
    a.knobs, b.knobs = Knobs(status=500) if status == 503 else Knobs(status=503), second
    r = post(server, False)
    assert r.status_code == status
    if status == 503:
        assert r.headers["retry-after"] == "7"
    assert (len(a.seen), len(b.seen)) == (1, 1)
    facts = server.audit_record(r.headers["x-request-id"])
    assert (facts["attempts"], facts["status"]) == (2, status)


def test_a_failure_after_the_first_chunk_ends_the_stream_and_is_not_switched(
    server: Server, fresh: tuple[FakeUpstream, FakeUpstream]
) -> None:
    a, b = fresh
    a.knobs = Knobs(text=TEXT, error_after=2)
    r = post(server, True)
    assert r.status_code == 200
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert "[DONE]" not in events
    assert json.loads(events[-1])["error"]["code"] == "engine_error"
    assert (len(a.seen), len(b.seen)) == (1, 0)
    # Audited as partial: no finish reason, the error's code, the one replica asked.
    facts = server.audit_record(r.headers["x-request-id"])
    assert (facts["finish_reason"], facts["error"]) == (None, "engine_error")
    assert (facts["attempts"], facts["replica"]) == (1, "vllm:0")
    # Not streaming: text was produced, so the fault is the answer, not a second replica.
    r = post(server, False)
    assert r.status_code == 500
    assert (len(a.seen), len(b.seen)) == (2, 0)


def test_a_replica_that_refuses_connections_fails_over(tmp_path: Path) -> None:
    with ExitStack() as stack:
        b = stack.enter_context(running_upstream())
        b.knobs = Knobs(text=TEXT)
        with ExitStack() as dying:  # up while medserve starts (it checks /v1/models)
            a = dying.enter_context(running_upstream())
            path = config(tmp_path / "m.toml", a, b)
            server = stack.enter_context(running_server(tmp_path / "medserve.log", "-c", str(path)))
        for stream in (True, False):  # a's port is closed now
            r = post(server, stream)
            assert r.status_code == 200
            assert answer(r, stream) == TEXT
        assert len(b.seen) == 2


def test_the_deadline_stops_failover(tmp_path: Path) -> None:
    """The model's 0.5 s runs out while the first replica says nothing: 504, and the
    healthy second replica is not asked (the request's time is spent)."""
    with running_upstream() as a, running_upstream() as b:
        a.knobs, b.knobs = Knobs(ttft_s=30), Knobs(text=TEXT)
        path = config(tmp_path / "m.toml", a, b, model="timeout_s = 0.5\n")
        with running_server(tmp_path / "medserve.log", "-c", str(path)) as server:
            for stream in (True, False):
                r = post(server, stream)
                assert r.status_code == 504
                assert r.json()["error"]["code"] == "timeout"
            assert (len(a.seen), len(b.seen)) == (2, 0)
            assert all(seen.left.wait(WAIT_S) for seen in a.seen)  # upstream closed
            facts = server.audit_record(r.headers["x-request-id"])
            assert (facts["attempts"], facts["status"]) == (1, 504)


@contextmanager
def raw_request(server: Server, stream: bool = True) -> Iterator[socket.socket]:
    """A chat request sent on a raw connection, closed on leaving: a client that leaves
    when the test says (nothing is sent to it before the commit point)."""
    body = json.dumps({**CHAT, "stream": stream}).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {DEV_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=WAIT_S) as sock:
        sock.sendall(head.encode() + body)
        yield sock


def until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"not within {WAIT_S} s"
        time.sleep(0.02)


def attempts(server: Server) -> dict[tuple[str, str], float]:
    """medserve_replica_attempts_total of MODEL by (replica, outcome)."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {
        (s.labels["replica"], s.labels["outcome"]): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "medserve_replica_attempts_total" and s.labels["model"] == MODEL
    }


def replicas(server: Server) -> list[dict[str, Any]]:
    """MODEL's replicas as /ready shows them."""
    ready = httpx.get(f"{server.url}/ready", headers=AUTH, timeout=10).json()
    found: list[dict[str, Any]] = ready["models"][0]["replicas"]
    return found


def faults(server: Server) -> dict[str, int]:
    """Each replica's consecutive faults as /ready shows them."""
    return {r["name"]: r["faults"] for r in replicas(server)}


def statuses(server: Server) -> dict[str, str]:
    """Each replica's status (ready, ejected, down) as /ready shows it."""
    return {r["name"]: r["status"] for r in replicas(server)}


def test_a_client_leaving_mid_failover_closes_the_upstream_and_blames_no_replica(
    server: Server, fresh: tuple[FakeUpstream, FakeUpstream]
) -> None:
    a, b = fresh
    a.knobs, b.knobs = Knobs(status=500), Knobs(ttft_s=30)
    before, counted = attempts(server), faults(server)
    with raw_request(server):
        until(lambda: len(b.seen) == 1)  # a failed; b is asked and says nothing yet
    assert b.seen[0].left.wait(WAIT_S)  # the second upstream request was closed
    until(lambda: attempts(server)[("vllm:1", "cancelled")] == before[("vllm:1", "cancelled")] + 1)
    after = attempts(server)
    assert after[("vllm:0", "fault")] == before[("vllm:0", "fault")] + 1
    assert after[("vllm:1", "fault")] == before[("vllm:1", "fault")]
    assert faults(server)["vllm:1"] == counted["vllm:1"]


# How the second replica cannot take the retry: full (max_outstanding 1, taken by a request
# held there), or ejected by its failing health checks.
REFUSALS = {
    "full": ("max_outstanding = 1\n", ""),
    "ejected": ("", "health_interval_s = 0.1\n"),
}


@pytest.mark.parametrize("refusal", list(REFUSALS))
def test_when_the_router_refuses_the_retry_the_last_fault_is_the_answer(
    tmp_path: Path, refusal: str
) -> None:
    keys, routing = REFUSALS[refusal]
    with ExitStack() as stack:
        a = stack.enter_context(running_upstream())
        b = stack.enter_context(running_upstream())
        path = config(tmp_path / "m.toml", a, b, second_keys=keys, routing=ROUTING + routing)
        server = stack.enter_context(running_server(tmp_path / "medserve.log", "-c", str(path)))
        a.knobs = Knobs(status=500)
        if refusal == "full":
            b.knobs = Knobs(ttft_s=30)
            stack.enter_context(raw_request(server))  # fails over to b, which it holds
            until(lambda: len(b.seen) == 1)
        else:
            b.knobs = Knobs(health=503)
            until(lambda: statuses(server)["vllm:1"] == "ejected")
        r = post(server, False)
        assert r.status_code == 500
        assert r.json()["error"]["code"] == "engine_error"
        assert len(b.seen) == (1 if refusal == "full" else 0)
        facts = server.audit_record(r.headers["x-request-id"])
        assert (facts["attempts"], facts["replica"], facts["status"]) == (1, "vllm:0", 500)
