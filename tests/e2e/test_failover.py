"""Failover before the commit point: a model with two remote vllm replicas (two fake
upstreams). A replica fault before the first chunk (503, 500, an error event, no first
event in time, a closed port) moves the request to the other replica, streaming or not;
a client error (400) never does; after the first chunk nothing is switched."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from tests.conftest import AUTH
from tests.fakeupstream import FakeUpstream, Knobs, running_upstream
from tests.serverproc import Server, running_server

pytestmark = pytest.mark.e2e
MODEL = "med-gpu"
TEXT = "Asthma causes wheezing and breathlessness"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "symptom?"}], "max_tokens": 20}
WAIT_S = 30.0  # bound on polling the audit log


# The first replica is asked first when both are idle (``ordered``), and the faults these
# tests inject one after the other never open its breaker nor mark it busy: each test
# starts from the same routing state. The breaker itself is tested in test_breaker.py.
ROUTING = 'balance = "ordered"\nbreaker_faults = 1000\nbusy_s = 0\n'


def config(path: Path, first: FakeUpstream | str, second: FakeUpstream, extra: str = "") -> Path:
    """Two replicas of MODEL: ``first`` (gives up on a first event after 1 s), ``second``;
    ``extra``: more TOML after them."""
    url = first if isinstance(first, str) else first.url
    replica = '[[models.replicas]]\nengine = "vllm"\nurl = "{}"\nserved_model_name = "m"\n'
    path.write_text(
        f'[[models]]\nid = "{MODEL}"\n'
        + replica.format(url)
        + "first_event_timeout_s = 1\n"
        + replica.format(second.url)
        + "first_event_timeout_s = 60\n"
        + f"[models.routing]\n{ROUTING}"
        + extra
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


def record(server: Server, request_id: str) -> dict[str, object]:
    """The audit record of ``request_id`` (written after the response for failures)."""
    db = server.log.parent / "audit" / "audit.db"
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        conn = sqlite3.connect(db)
        rows = conn.execute("SELECT body FROM records WHERE kind = 'request'").fetchall()
        conn.close()
        for (body,) in rows:
            found: dict[str, object] = json.loads(body)
            if found.get("request_id") == request_id:
                return found
        time.sleep(0.05)
    raise AssertionError(f"no audit record for {request_id} within {WAIT_S} s")


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
    facts = record(server, r.headers["x-request-id"])
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
    facts = record(server, r.headers["x-request-id"])
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
    facts = record(server, r.headers["x-request-id"])
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
