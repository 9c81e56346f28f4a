"""GPU → CPU fallback through the HTTP layer, on fake engines standing in for a GPTQ
replica and the GGUF of the same checkpoint (real manifests, real audit store, real keys).

A fallback engine answers only when no replica can (faulted before its first chunk, or
full), says so in ``X-Medserve-Fallback``, and the audit record carries ``fallback`` and the
answering artifact's ``weights_sha256``. A key or a model that forbids fallback gets the
replicas' fault instead, and the fallback engine is never asked.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from medserve.api.app import create_app
from medserve.auth.keys import KeyStore
from medserve.cli import app
from medserve.config import ModelSpec, Settings
from medserve.engines.base import Health
from medserve.engines.fake import FakeEngine
from medserve.errors import EngineError, OverloadedError, UnavailableError
from medserve.router import Router
from tests.artifacts import artifact, checkpoint, weights_sha256
from tests.conftest import AUTH
from tests.sse import DONE, events

CHAT = "/v1/chat/completions"
MODEL = "med"
TEXT = "wheeze and cough"
runner = CliRunner()
BODY = {"model": MODEL, "messages": [{"role": "user", "content": TEXT}], "max_tokens": 20}


@dataclass
class Setup:
    client: TestClient
    replicas: list[FakeEngine]
    fallback: list[FakeEngine]
    gptq: str  # the replicas' weights_sha256
    gguf: str  # the fallback's
    audit: Path


@pytest.fixture
def manifests(tmp_path: Path) -> tuple[Path, Path]:
    source = checkpoint(tmp_path / "ckpt")
    return artifact(tmp_path / "gptq", source, "gptq"), artifact(tmp_path / "gguf", source)


@contextmanager
def serve(
    manifests: tuple[Path, Path],
    audit_path: Path,
    replicas: int = 1,
    cors: list[str] | None = None,
    **model: Any,
) -> Iterator[Setup]:
    gptq, gguf = manifests
    spec = ModelSpec.model_validate(
        {
            "id": MODEL,
            "replicas": [{"engine": "fake", "manifest": gptq}] * replicas,
            "fallback": [{"engine": "fake", "manifest": gguf}],
            **model,
        }
    )
    router = Router.from_specs([spec])
    (served,) = router
    engines = [e for e in served.engines if isinstance(e, FakeEngine)]
    app = create_app(Settings(cors_origins=cors or []), router)
    with TestClient(app, raise_server_exceptions=False, headers=AUTH) as client:
        yield Setup(
            client,
            engines[:replicas],
            engines[replicas:],
            weights_sha256(gptq),
            weights_sha256(gguf),
            audit_path,
        )


@pytest.fixture
def setup(manifests: tuple[Path, Path], audit_path: Path) -> Iterator[Setup]:
    with serve(manifests, audit_path) as s:
        yield s


def post(s: Setup, stream: bool, headers: dict[str, str] | None = None) -> Any:
    return s.client.post(CHAT, json={**BODY, "stream": stream}, headers=headers)


def text_of(r: Any, stream: bool) -> str:
    if not stream:
        return str(r.json()["choices"][0]["message"]["content"])
    found = events(r.text)
    assert found[-1] == DONE
    return "".join(
        e["choices"][0]["delta"].get("content") or "" for e in found[:-1] if e["choices"]
    )


def record(audit: Path, request_id: str) -> dict[str, Any]:
    conn = sqlite3.connect(audit)
    rows = conn.execute("SELECT body FROM records WHERE kind = 'request'").fetchall()
    conn.close()
    found: list[dict[str, Any]] = [json.loads(body) for (body,) in rows]
    (mine,) = [r for r in found if r["request_id"] == request_id]
    return mine


# How a replica fails before its first chunk (the fake engine raises it there).
DOWN: dict[str, Any] = {
    "unreachable": UnavailableError("cannot be reached", code="engine_unavailable"),
    "5xx": EngineError("failed", code="engine_error"),
    "full": OverloadedError("full", retry_after=7),
    "no-room": "capacity",  # the router never admits to it
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("down", list(DOWN))
def test_replica_down_fallback_answers_announced_and_audited(
    setup: Setup, down: str, stream: bool
) -> None:
    (replica,), (fallback,) = setup.replicas, setup.fallback
    if DOWN[down] == "capacity":
        replica.capacity = 0
    else:
        replica.script(DOWN[down])
    r = post(setup, stream)
    assert r.status_code == 200
    assert TEXT in text_of(r, stream)
    assert len(fallback.history) == 1
    assert len(replica.history) == (0 if down == "no-room" else 1)
    assert r.headers["x-medserve-fallback"] == "fake"
    assert r.headers["x-medserve-engine"] == "fake:1"
    rec = record(setup.audit, r.headers["x-request-id"])
    assert (rec["fallback"], rec["weights_sha256"]) == (True, setup.gguf)
    assert (rec["replica"], rec["attempts"]) == ("fake:1", 1 if down == "no-room" else 2)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_replica_that_answers_is_never_replaced_by_the_fallback(
    setup: Setup, stream: bool
) -> None:
    for _ in range(3):
        r = post(setup, stream)
        assert r.status_code == 200 and TEXT in text_of(r, stream)
        assert "x-medserve-fallback" not in r.headers
        assert r.headers["x-medserve-engine"] == "fake:0"
        rec = record(setup.audit, r.headers["x-request-id"])
        assert (rec["fallback"], rec["weights_sha256"], rec["attempts"]) == (
            False,
            setup.gptq,
            1,
        )
    assert len(setup.replicas[0].history) == 3 and setup.fallback[0].history == []


def test_the_new_record_fields_verify_and_export(setup: Setup) -> None:
    """Records with ``fallback`` and ``weights_sha256`` chain and verify like any other
    (`medserve audit verify`), and the CSV export has a column for each."""
    assert post(setup, False).status_code == 200
    setup.replicas[0].capacity = 0
    assert post(setup, True).headers["x-medserve-fallback"] == "fake"
    db = str(setup.audit)
    done = runner.invoke(app, ["audit", "verify", "--db", db])
    assert done.exit_code == 0 and "intact" in done.stdout
    done = runner.invoke(app, ["audit", "export", "--db", db, "--format", "csv"])
    rows = [r for r in csv.DictReader(io.StringIO(done.stdout)) if r["kind"] == "request"]
    found = [(r["fallback"], r["weights_sha256"]) for r in rows if r["model"] == MODEL]
    assert found == [("False", setup.gptq), ("True", setup.gguf)]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("down", ["unreachable", "full", "no-room"])
def test_a_key_that_forbids_fallback_gets_the_replicas_503(
    setup: Setup, tmp_path: Path, down: str, stream: bool
) -> None:
    key, token = KeyStore(tmp_path / "keys.db").create("strict-app", fallback=False)
    assert not key.fallback
    (replica,), (fallback,) = setup.replicas, setup.fallback
    if DOWN[down] == "capacity":
        replica.capacity = 0
    else:
        replica.script(DOWN[down])
    r = post(setup, stream, {"Authorization": f"Bearer {token}"})
    assert r.status_code == 503
    assert r.headers["retry-after"] == {"unreachable": "5", "full": "7", "no-room": "1"}[down]
    assert "x-medserve-fallback" not in r.headers
    assert fallback.history == []
    # The same failure for a key that allows fallback is answered by the fallback engine.
    replica.capacity = 0
    assert post(setup, stream).headers["x-medserve-fallback"] == "fake"


def test_a_model_that_forbids_fallback_answers_the_replicas_fault(
    manifests: tuple[Path, Path], audit_path: Path
) -> None:
    with serve(manifests, audit_path, fallback_enabled=False) as s:
        assert s.fallback == []  # kept in the registry, never started
        s.replicas[0].script(OverloadedError("full", retry_after=3))
        r = post(s, False)
        assert (r.status_code, r.headers["retry-after"]) == (503, "3")
        s.replicas[0].capacity = 0
        r = post(s, True)
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"


@pytest.mark.parametrize(
    ("failover", "asked"), [(True, [1, 1, 0]), (False, [1, 0, 1])], ids=["on", "off"]
)
def test_replica_failover_switch(
    manifests: tuple[Path, Path], audit_path: Path, failover: bool, asked: list[int]
) -> None:
    """Two replicas and a fallback; the first replica faults. With replica failover on the
    second replica answers; off, the fallback engine does (its own tier)."""
    with serve(
        manifests,
        audit_path,
        replicas=2,
        replica_failover=failover,
        routing={"balance": "ordered"},  # the first replica is asked first
    ) as s:
        s.replicas[0].script(EngineError("failed", code="engine_error"))
        r = post(s, False)
        assert r.status_code == 200
        engines = [*s.replicas, *s.fallback]
        assert [len(e.history) for e in engines] == asked
        assert ("x-medserve-fallback" in r.headers) == (not failover)


def test_replica_failover_off_and_fallback_forbidden_answers_the_fault(
    manifests: tuple[Path, Path], audit_path: Path, tmp_path: Path
) -> None:
    _, token = KeyStore(tmp_path / "keys.db").create("strict-app", fallback=False)
    with serve(
        manifests, audit_path, replicas=2, replica_failover=False, routing={"balance": "ordered"}
    ) as s:
        s.replicas[0].script(EngineError("failed", code="engine_error"))
        r = post(s, False, {"Authorization": f"Bearer {token}"})
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
        assert [len(e.history) for e in [*s.replicas, *s.fallback]] == [1, 0, 0]


def test_cors_exposes_the_announcement(manifests: tuple[Path, Path], audit_path: Path) -> None:
    origin = "https://ward.example"
    with serve(manifests, audit_path, cors=[origin]) as s:
        s.replicas[0].capacity = 0
        r = post(s, False, {"Origin": origin})
        assert r.status_code == 200
        exposed = {h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")}
        assert {"x-medserve-fallback", "x-medserve-engine"} <= exposed


def metric(s: Setup, name: str, **labels: str) -> float | None:
    """The one sample of ``name`` on /metrics whose labels include ``labels``."""
    page = s.client.get("/metrics").text
    found = [
        sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    ]
    assert len(found) <= 1, found
    return found[0] if found else None


def test_fallback_engines_are_marked_counted_and_left_out_of_engine_ready(setup: Setup) -> None:
    """/ready marks the fallback engine; only answers from it count as fallback answers;
    an ejected replica turns its kind's medserve_engine_ready to 0 even while the fallback
    (of the same kind here) answers for it."""
    ready = setup.client.get("/ready").json()
    marks = [(r["name"], r["fallback"]) for r in ready["models"][0]["replicas"]]
    assert marks == [("fake:0", False), ("fake:1", True)]
    answers = {"name": "medserve_fallback_answers_total", "model": MODEL, "engine": "fake"}
    kind_ready = {"name": "medserve_engine_ready", "model": MODEL, "engine": "fake"}
    assert post(setup, False).status_code == 200  # the replica answers
    assert (metric(setup, **answers), metric(setup, **kind_ready)) == (0, 1)
    router: Router = setup.client.app.state.router  # type: ignore[attr-defined]
    router.state(setup.replicas[0]).checked(Health(ready=False, unreachable=True))  # refused
    for _ in range(2):
        r = post(setup, False)
        assert r.status_code == 200 and r.headers["x-medserve-fallback"] == "fake"
    assert (metric(setup, **answers), metric(setup, **kind_ready)) == (2, 0)
    ready = setup.client.get("/ready").json()
    assert ready["models"][0]["ready"] is True  # the fallback still serves the model
    assert [r["status"] for r in ready["models"][0]["replicas"]] == ["ejected", "ready"]
