"""What the router reads from a vLLM server: the load in its /metrics (current and old
metric names, missing = unknown, never 0) and a refused connection told apart from a
failing /health. Against the fake upstream on loopback, plus a parse table."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import anyio
import pytest

from medserve.engines.base import LoadStats
from medserve.engines.upstream import parse_load
from medserve.engines.vllm import VllmEngine, VllmSpec
from tests.conftest import flat_spec
from tests.engines.test_vllm import req
from tests.fakeupstream import FakeUpstream, Knobs, metrics_text, running_upstream
from tests.serverproc import free_port

pytestmark = pytest.mark.anyio
UNKNOWN = LoadStats()
LABELS = '{engine="0",model_name="m"}'


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with running_upstream() as server:
        yield server


def spec(url: str) -> VllmSpec:
    return VllmSpec(
        engine="vllm", url=url, served_model_name="m", health_ttl_s=0, start_timeout_s=5
    )


@pytest.fixture
async def engine(upstream: FakeUpstream) -> AsyncIterator[VllmEngine]:
    upstream.knobs = Knobs()
    e = VllmEngine(flat_spec(id="med", engine="fake"), spec(upstream.url))
    await e.start()
    yield e
    await e.close()


# (the /metrics body, what is read from it)
PARSE = [
    pytest.param(
        metrics_text(Knobs(waiting=3, kv_usage=0.25), running=2),
        LoadStats(waiting=3, running=2, kv_cache_usage=0.25),
        id="current names, among histograms and other families",
    ),
    pytest.param(
        metrics_text(Knobs(waiting=0, kv_usage=0.5, old_kv_name=True), running=0),
        LoadStats(waiting=0, running=0, kv_cache_usage=0.5),
        id="old KV name (vllm:gpu_cache_usage_perc)",
    ),
    pytest.param(
        f"vllm:kv_cache_usage_perc{LABELS} 0.1\nvllm:gpu_cache_usage_perc{LABELS} 0.9\n",
        LoadStats(kv_cache_usage=0.1),
        id="the current name wins over the old one",
    ),
    pytest.param(
        metrics_text(Knobs(waiting=None, kv_usage=None), running=1),
        LoadStats(running=1),
        id="missing metrics are unknown, not 0",
    ),
    pytest.param(
        'vllm:num_requests_waiting{engine="0"} 2\nvllm:num_requests_waiting{engine="1"} 3\n'
        'vllm:kv_cache_usage_perc{engine="0"} 0.25\nvllm:kv_cache_usage_perc{engine="1"} 0.75\n',
        LoadStats(waiting=5, kv_cache_usage=0.5),
        id="data-parallel engines: waiting added up, KV usage averaged",
    ),
    pytest.param(
        f"vllm:num_requests_waiting{LABELS} NaN\nvllm:kv_cache_usage_perc{LABELS} +Inf\n",
        UNKNOWN,
        id="not a finite number is unknown",
    ),
    pytest.param("vllm:num_requests_waiting{engine= 3\n", UNKNOWN, id="malformed is unknown"),
    pytest.param("<html>not metrics</html>", UNKNOWN, id="not Prometheus text"),
    pytest.param(
        'vllm:num_requests_waiting_by_reason{reason="capacity"} 4\n',
        UNKNOWN,
        id="a longer name is another metric",
    ),
    pytest.param("", UNKNOWN, id="empty"),
]


@pytest.mark.parametrize(("text", "expected"), PARSE)
def test_parse_load(text: str, expected: LoadStats) -> None:
    assert parse_load(text) == expected


# (knobs of the fake upstream, what load_stats reads: None = could not read)
SCRAPES = [
    pytest.param(Knobs(waiting=4, kv_usage=0.75), LoadStats(4, 0, 0.75), id="current names"),
    pytest.param(
        Knobs(waiting=1, kv_usage=0.5, old_kv_name=True), LoadStats(1, 0, 0.5), id="old KV name"
    ),
    pytest.param(Knobs(waiting=None, kv_usage=None), LoadStats(running=0), id="missing"),
    pytest.param(Knobs(metrics=404), None, id="no /metrics (a pool upstream)"),
    pytest.param(Knobs(metrics=500), None, id="/metrics fails"),
]


@pytest.mark.parametrize(("knobs", "expected"), SCRAPES)
async def test_load_stats_from_the_upstream(
    engine: VllmEngine, upstream: FakeUpstream, knobs: Knobs, expected: LoadStats | None
) -> None:
    upstream.knobs = knobs
    assert await engine.load_stats() == expected


async def test_running_counts_requests_in_flight(
    engine: VllmEngine, upstream: FakeUpstream
) -> None:
    upstream.knobs = Knobs(text="a b c d", stall_after=1)
    stream = engine.generate(req())
    assert (await anext(stream)).text == "a"
    stats = await engine.load_stats()
    assert stats is not None and stats.running == 1
    await stream.aclose()
    with anyio.fail_after(10):
        while (stats := await engine.load_stats()) is None or stats.running != 0:
            await anyio.sleep(0.01)


# (/health status, ready, unreachable)
HEALTH = [
    pytest.param(200, True, False, id="200 ready"),
    pytest.param(503, False, False, id="503 not ready, reachable"),
]


@pytest.mark.parametrize(("status", "ready", "unreachable"), HEALTH)
async def test_health(
    engine: VllmEngine, upstream: FakeUpstream, status: int, ready: bool, unreachable: bool
) -> None:
    upstream.knobs = Knobs(health=status)
    h = await engine.health()
    assert (h.ready, h.unreachable) == (ready, unreachable)


async def test_a_refused_connection_is_unreachable() -> None:
    with running_upstream() as gone:
        e = VllmEngine(flat_spec(id="med", engine="fake"), spec(gone.url))
        await e.start()
    try:  # the upstream has stopped: its port refuses connections
        h = await e.health()
        assert (h.ready, h.unreachable) == (False, True)
        assert await e.load_stats() is None
    finally:
        await e.close()


async def test_nothing_is_read_before_start() -> None:
    e = VllmEngine(flat_spec(id="med", engine="fake"), spec(f"http://127.0.0.1:{free_port()}"))
    assert await e.load_stats() is None
    assert not (await e.health()).ready
