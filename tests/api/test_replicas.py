"""Serving reports each attempt's outcome to the router, and /ready, /v1/models and
/metrics show each replica: two fake replicas in process, scripted per request.

A replica fault counts against it (and opens its breaker after ``breaker_faults``); a
client error (400) or a full replica (busy) never does. One replica out leaves the model
ready and listed."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from medserve.api.app import create_app
from medserve.config import ModelSpec, Settings
from medserve.engines.base import Health
from medserve.engines.fake import FakeEngine, FakeSpec
from medserve.errors import (
    ContextLengthError,
    EngineError,
    InvalidRequestError,
    OverloadedError,
    RequestTimeoutError,
    UnavailableError,
)
from medserve.router import Router, Served
from tests.conftest import AUTH

MODEL = "duo"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "a b c"}], "max_tokens": 5}
REFUSED = Health(ready=False, unreachable=True)


class Replica(FakeEngine):
    def __init__(self, spec: ModelSpec, index: int) -> None:
        replica = spec.replicas[index]
        assert isinstance(replica, FakeSpec)
        super().__init__(spec, replica)
        self.spec = spec
        self.answer = Health(ready=True)

    async def health(self) -> Health:
        return self.answer if self._started else Health(ready=False)


@pytest.fixture
def duo() -> tuple[Replica, Replica]:
    spec = ModelSpec.model_validate(
        {
            "id": MODEL,
            "replicas": [{"engine": "fake", "context_length": 64}] * 2,
            # a first when both are idle; the breaker opens after two faults in a row
            "routing": {"balance": "ordered", "breaker_faults": 2, "busy_s": 0},
        }
    )
    return Replica(spec, 0), Replica(spec, 1)


@pytest.fixture
def router(duo: tuple[Replica, Replica]) -> Router:
    a, _ = duo
    return Router([Served(a.spec, duo)], rng=random.Random(3))


@pytest.fixture
def client(router: Router) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(), router), headers=AUTH) as c:
        yield c


def attempts(client: TestClient) -> dict[tuple[str, str], float]:
    """medserve_replica_attempts_total by (replica, outcome)."""
    found = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.name == "medserve_replica_attempts_total":
                found[(s.labels["replica"], s.labels["outcome"])] = s.value
    return found


# (what a answers before its first chunk, the status, a's outcome, a's faults, b asked)
OUTCOMES = [
    pytest.param(EngineError("x"), 200, "fault", 1, True, id="engine error: a fault"),
    pytest.param(UnavailableError("x"), 200, "fault", 1, True, id="unreachable: a fault"),
    pytest.param(RequestTimeoutError("x"), 200, "fault", 1, True, id="no first event: a fault"),
    pytest.param(OverloadedError("x"), 200, "busy", 0, True, id="full: busy, not a fault"),
    pytest.param(InvalidRequestError("x"), 400, "client_error", 0, False, id="400: not a fault"),
    pytest.param(
        ContextLengthError("x"), 400, "client_error", 0, False, id="too long: not a fault"
    ),
]


@pytest.mark.parametrize(("error", "status", "outcome", "faults", "failed_over"), OUTCOMES)
def test_each_attempt_is_reported(
    client: TestClient,
    router: Router,
    duo: tuple[Replica, Replica],
    error: Exception,
    status: int,
    outcome: str,
    faults: int,
    failed_over: bool,
) -> None:
    a, b = duo
    a.script(error)
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == status
    assert router.state(a).faults == faults
    assert len(b.requests) == (1 if failed_over else 0)
    counts = attempts(client)
    assert counts[("fake:0", outcome)] == 1
    assert counts[("fake:1", "ok")] == (1 if failed_over else 0)
    assert sum(counts.values()) == (2 if failed_over else 1)


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_client_errors_never_open_the_breaker_and_faults_do(
    client: TestClient, router: Router, duo: tuple[Replica, Replica], stream: bool
) -> None:
    a, b = duo
    for _ in range(5):
        a.script(InvalidRequestError("bad"))
        assert client.post("/v1/chat/completions", json={**CHAT, "stream": stream}).is_client_error
    assert (router.state(a).breaker, router.state(a).faults) == ("closed", 0)
    for _ in range(2):
        a.script(EngineError("broken"))
        assert client.post("/v1/chat/completions", json={**CHAT, "stream": stream}).is_success
    assert router.state(a).breaker == "open"
    asked = len(a.history)
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert len(a.history) == asked  # the open breaker sent it to b
    replicas = client.get("/ready").json()["models"][0]["replicas"]
    assert [(r["name"], r["breaker"], r["faults"]) for r in replicas] == [
        ("fake:0", "open", 2),
        ("fake:1", "closed", 0),
    ]


def test_a_success_restarts_the_count(
    client: TestClient, router: Router, duo: tuple[Replica, Replica]
) -> None:
    a, _ = duo
    for _ in range(3):
        a.script(EngineError("broken"))
        client.post("/v1/chat/completions", json=CHAT)
        client.post("/v1/chat/completions", json=CHAT)  # a answers this one
    assert (router.state(a).breaker, router.state(a).faults) == ("closed", 0)


def test_ready_and_models_with_one_replica_out(
    client: TestClient, router: Router, duo: tuple[Replica, Replica]
) -> None:
    a, b = duo
    a.answer = REFUSED
    client.portal.call(router.monitor.check_once)  # type: ignore[union-attr]
    r = client.get("/ready")
    assert r.status_code == 200
    (model,) = r.json()["models"]
    assert model["ready"] is True
    assert model["replicas"] == [
        {
            "name": "fake:0",
            "fallback": False,
            "status": "ejected",
            "breaker": "closed",
            "outstanding": 0,
            "faults": 0,
            "waiting": None,  # a fake engine reports no load: unknown
            "running": None,
            "kv_cache_usage": None,
        },
        {
            "name": "fake:1",
            "fallback": False,
            "status": "ready",
            "breaker": "closed",
            "outstanding": 0,
            "faults": 0,
            "waiting": None,
            "running": None,
            "kv_cache_usage": None,
        },
    ]
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [MODEL]
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200
    assert (len(a.history), len(b.history)) == (0, 1)
    b.answer = REFUSED
    client.portal.call(router.monitor.check_once)  # type: ignore[union-attr]
    assert client.get("/ready").status_code == 503
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [MODEL]
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "no_healthy_replica"
    assert int(r.headers["retry-after"]) >= 1


def test_replica_metrics_have_bounded_labels(
    client: TestClient, router: Router, duo: tuple[Replica, Replica]
) -> None:
    a, _ = duo
    a.answer = REFUSED
    client.portal.call(router.monitor.check_once)  # type: ignore[union-attr]
    client.post("/v1/chat/completions", json=CHAT)
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    expected = {
        "medserve_replica_state": {"model", "engine", "replica", "state"},
        "medserve_replica_breaker": {"model", "engine", "replica", "state"},
        "medserve_replica_outstanding": {"model", "engine", "replica"},
        "medserve_replica_attempts": {"model", "engine", "replica", "outcome"},
    }
    for name, labels in expected.items():
        samples = [s for s in families[name].samples if not s.name.endswith("_created")]
        assert samples, name
        for s in samples:
            assert set(s.labels) == labels, s
            assert s.labels["model"] == MODEL and s.labels["engine"] == "fake"
            assert s.labels["replica"] in ("fake:0", "fake:1")
    state = {
        (s.labels["replica"], s.labels["state"]): s.value
        for s in families["medserve_replica_state"].samples
    }
    assert state == {
        ("fake:0", "ready"): 0,
        ("fake:0", "ejected"): 1,
        ("fake:0", "down"): 0,
        ("fake:1", "ready"): 1,
        ("fake:1", "ejected"): 0,
        ("fake:1", "down"): 0,
    }
    outcomes = {s.labels["outcome"] for s in families["medserve_replica_attempts"].samples}
    assert outcomes == {"ok", "fault", "busy", "client_error", "cancelled"}
