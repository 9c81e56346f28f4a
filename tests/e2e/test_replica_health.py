"""Replica health through a real `medserve serve` and two fake vLLM upstreams: a replica
that goes down (or is down at start) is ejected and the model stays ready and listed; the
breaker opens, half-opens and closes over real requests; scraped load steers requests;
/metrics shows replica state with bounded labels. Short intervals in [models.routing];
every wait polls /ready with a bound."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import AUTH
from tests.e2e.test_failover import (
    MODEL,
    TEXT,
    answer,
    config,
    post,
    replicas,
    statuses,
    until,
)
from tests.fakeupstream import FakeUpstream, Knobs, running_upstream
from tests.serverproc import Server, free_port, running_server

pytestmark = pytest.mark.e2e
FAST = 'balance = "ordered"\nbusy_s = 0\nhealth_interval_s = 0.1\nscrape_interval_s = 0.1\n'


@pytest.fixture
def pair() -> Iterator[tuple[FakeUpstream, FakeUpstream]]:
    with running_upstream() as a, running_upstream() as b:
        a.knobs, b.knobs = Knobs(text=TEXT), Knobs(text=TEXT)
        yield a, b


def serve(
    stack: ExitStack, tmp_path: Path, a: FakeUpstream, b: FakeUpstream, routing: str = FAST
) -> Server:
    """`medserve serve` of MODEL on replicas ``a`` and ``b`` until ``stack`` closes."""
    path = config(tmp_path / "m.toml", a, b, routing=routing)
    return stack.enter_context(running_server(tmp_path / "medserve.log", "-c", str(path)))


def by_name(server: Server) -> dict[str, dict[str, object]]:
    return {r["name"]: r for r in replicas(server)}


def listed(server: Server) -> list[tuple[str, int]]:
    data = httpx.get(f"{server.url}/v1/models", headers=AUTH, timeout=10).json()["data"]
    return [(m["id"], m["context_length"]) for m in data]


def test_a_replica_that_goes_down_is_ejected_and_the_model_stays_served(
    tmp_path: Path, pair: tuple[FakeUpstream, FakeUpstream]
) -> None:
    a, b = pair
    with ExitStack() as stack:
        server = serve(stack, tmp_path, a, b)
        a.knobs = Knobs(health=503)  # a's /health fails: ejected after three checks
        until(lambda: statuses(server) == {"vllm:0": "ejected", "vllm:1": "ready"})
        ready = httpx.get(f"{server.url}/ready", headers=AUTH, timeout=10)
        assert ready.status_code == 200
        assert ready.json()["models"][0]["ready"] is True
        assert listed(server) == [(MODEL, 256)]
        for stream in (True, False):
            r = post(server, stream)
            assert r.status_code == 200 and answer(r, stream) == TEXT
            facts = server.audit_record(r.headers["x-request-id"])
            assert (facts["attempts"], facts["replica"]) == (1, "vllm:1")  # a not even tried
        assert len(a.seen) == 0
        a.knobs = Knobs(text=TEXT)  # the first passing check readmits it
        until(lambda: statuses(server) == {"vllm:0": "ready", "vllm:1": "ready"})
        assert answer(post(server, False), False) == TEXT
        assert len(a.seen) == 1


def test_a_replica_down_at_start_does_not_stop_the_gateway(
    tmp_path: Path, pair: tuple[FakeUpstream, FakeUpstream]
) -> None:
    _, b = pair
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with ExitStack() as stack:
        # a's start gives up after 1 s, then it is retried in the background
        keys = "start_timeout_s = 1\n"
        path = config(tmp_path / "m.toml", closed, b, routing=FAST, first_keys=keys)
        server = stack.enter_context(running_server(tmp_path / "medserve.log", "-c", str(path)))
        assert statuses(server) == {"vllm:0": "down", "vllm:1": "ready"}
        assert httpx.get(f"{server.url}/ready", headers=AUTH, timeout=10).status_code == 200
        assert listed(server) == [(MODEL, 256)]  # b's context: a never said its own
        assert answer(post(server, True), True) == TEXT


def test_the_breaker_opens_half_opens_and_closes(
    tmp_path: Path, pair: tuple[FakeUpstream, FakeUpstream]
) -> None:
    a, b = pair
    routing = FAST + "breaker_faults = 2\nbreaker_open_s = 1\n"
    with ExitStack() as stack:
        server = serve(stack, tmp_path, a, b, routing=routing)
        a.knobs = Knobs(status=500)
        for _ in range(2):  # each fails over to b
            assert answer(post(server, False), False) == TEXT
        assert (by_name(server)["vllm:0"]["breaker"], len(a.seen)) == ("open", 2)
        assert answer(post(server, True), True) == TEXT
        assert len(a.seen) == 2  # open: not asked
        until(lambda: by_name(server)["vllm:0"]["breaker"] == "half_open")
        a.knobs = Knobs(text=TEXT)
        r = post(server, False)  # the trial (ordered: a first when idle)
        assert server.audit_record(r.headers["x-request-id"])["replica"] == "vllm:0"
        assert (by_name(server)["vllm:0"]["breaker"], len(a.seen)) == ("closed", 3)


def test_scraped_load_steers_requests_and_shows_in_ready(
    tmp_path: Path, pair: tuple[FakeUpstream, FakeUpstream]
) -> None:
    a, b = pair
    with ExitStack() as stack:
        server = serve(stack, tmp_path, a, b)
        a.knobs = Knobs(text=TEXT, waiting=10, kv_usage=0.5, old_kv_name=True)
        until(lambda: by_name(server)["vllm:0"]["waiting"] == 10)
        assert by_name(server)["vllm:0"]["kv_cache_usage"] == 0.5  # under its old name
        r = post(server, False)
        assert server.audit_record(r.headers["x-request-id"])["replica"] == "vllm:1"
        a.knobs = Knobs(text=TEXT, waiting=None, kv_usage=None)  # not exported: unknown
        until(lambda: by_name(server)["vllm:0"]["waiting"] is None)
        assert by_name(server)["vllm:0"]["kv_cache_usage"] is None
        r = post(server, False)
        assert server.audit_record(r.headers["x-request-id"])["replica"] == "vllm:0"


def test_replica_metrics_name_replicas_not_urls(
    tmp_path: Path, pair: tuple[FakeUpstream, FakeUpstream]
) -> None:
    a, b = pair
    with ExitStack() as stack:
        server = serve(stack, tmp_path, a, b)
        a.knobs = Knobs(health=503)
        until(lambda: statuses(server)["vllm:0"] == "ejected")
        post(server, False)
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name.startswith("medserve_replica_")
    }
    key = {"engine": "vllm", "model": MODEL}
    ejected = {**key, "replica": "vllm:0", "state": "ejected"}
    answered = {**key, "replica": "vllm:1", "outcome": "ok"}
    assert samples[("medserve_replica_state", tuple(sorted(ejected.items())))] == 1
    assert samples[("medserve_replica_attempts_total", tuple(sorted(answered.items())))] == 1
    lines = [line for line in text.splitlines() if line.startswith("medserve_replica_")]
    assert lines and not any("127.0.0.1" in line or "http" in line for line in lines)


PROBE_S = 3.0  # a readiness probe's patience here (Kubernetes' default is 1 s): generous
HANG_S = 60.0  # how long the hung replica's /health says nothing


def test_a_hung_replica_never_makes_ready_wait(
    tmp_path: Path, pair: tuple[FakeUpstream, FakeUpstream]
) -> None:
    """A replica that accepts connections and never answers /health (a SIGSTOPped vLLM):
    /ready and /metrics answer from the router's memory, well within a probe's patience
    (httpx raises past PROBE_S), and show the replica ejected once its checks time out."""
    a, b = pair
    routing = FAST + "health_timeout_s = 0.5\n"
    with ExitStack() as stack:
        server = serve(stack, tmp_path, a, b, routing=routing)
        a.knobs = Knobs(text=TEXT, health_stall_s=HANG_S)

        def probe() -> dict[str, str]:
            r = httpx.get(f"{server.url}/ready", headers=AUTH, timeout=PROBE_S)
            assert r.status_code == 200  # b is ready: so is the model, all along
            return {v["name"]: v["status"] for v in r.json()["models"][0]["replicas"]}

        until(lambda: probe() == {"vllm:0": "ejected", "vllm:1": "ready"})
        assert httpx.get(f"{server.url}/metrics", timeout=PROBE_S).status_code == 200
        r = post(server, False)
        assert server.audit_record(r.headers["x-request-id"])["replica"] == "vllm:1"
