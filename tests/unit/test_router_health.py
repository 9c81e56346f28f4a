"""The router's replica health (medserve.health): active checks eject and readmit, the
circuit breaker opens, half-opens with one trial and closes or re-opens, scraped load goes
stale, and admission picks the least loaded healthy replica (power of two choices with
more than two). Fake engines, an injected clock and a seeded random source: no waiting
for real seconds, except the bounded health-check timeout."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest

from medserve.config import ModelSpec
from medserve.engines.base import Engine, Health, LoadStats
from medserve.engines.fake import FakeEngine, FakeSpec
from medserve.errors import EngineError, OverloadedError, UnavailableError
from medserve.health import ReplicaState
from medserve.router import Router, Served

pytestmark = pytest.mark.anyio
HANG = "hang"  # a health check that never answers
OK, FAIL = Health(ready=True), Health(ready=False)
REFUSED = Health(ready=False, unreachable=True)


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


class Clock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Replica(FakeEngine):
    """A fake replica whose health checks, load and start a test scripts."""

    def __init__(self, model: ModelSpec, index: int) -> None:
        spec = model.replicas[index]
        assert isinstance(spec, FakeSpec)
        super().__init__(model, spec)
        self.answer: Health | BaseException | str = OK
        self.stats: LoadStats | None = None
        self.start_failures = 0  # starts that raise before one succeeds

    async def start(self) -> None:
        if self.start_failures:
            self.start_failures -= 1
            raise EngineError("cannot start")
        await super().start()

    async def health(self) -> Health:
        answer = self.answer
        if answer == HANG:
            await asyncio.Event().wait()
        if isinstance(answer, BaseException):
            raise answer
        assert isinstance(answer, Health)
        return answer


class Reporting(Replica):
    """A replica that reports its own load (as vLLM does)."""

    async def load_stats(self) -> LoadStats | None:
        return self.stats


def model(count: int = 2, **routing: Any) -> ModelSpec:
    return ModelSpec.model_validate(
        {"id": "m", "replicas": [{"engine": "fake"}] * count, "routing": routing}
    )


def build(
    count: int = 2, kind: type[Replica] = Replica, seed: int = 7, **routing: Any
) -> tuple[Router, list[Replica], Clock]:
    spec = model(count, **routing)
    engines = [kind(spec, i) for i in range(count)]
    clock = Clock()
    router = Router([Served(spec, tuple(engines))], rng=random.Random(seed), clock=clock)
    return router, engines, clock


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Router, list[Replica], Clock]]:
    router, engines, clock = build(health_timeout_s=0.05)
    await router.start()
    yield router, engines, clock
    await router.close()


def served(router: Router) -> Served:
    return router.get("m")


async def pick(router: Router, exclude: tuple[Engine, ...] = ()) -> Engine:
    """The engine the next request would be admitted to (the permit given back)."""
    async with router.admit(served(router), exclude) as engine:
        return engine


# -- active health checks ----------------------------------------------------------------

# (what each check answers, the first replica's status after each)
EJECTION = [
    pytest.param([FAIL, FAIL, FAIL], ["ready", "ready", "ejected"], id="three failures eject"),
    pytest.param([FAIL, FAIL, OK, FAIL, FAIL], ["ready"] * 5, id="a pass restarts the count"),
    pytest.param([REFUSED], ["ejected"], id="a refused connection ejects at once"),
    pytest.param([FAIL, FAIL, FAIL, OK], ["ready"] * 2 + ["ejected", "ready"], id="readmitted"),
    pytest.param([HANG, HANG, HANG], ["ready", "ready", "ejected"], id="timeouts are failures"),
    pytest.param(
        [RuntimeError("x")] * 3, ["ready", "ready", "ejected"], id="a raising check fails"
    ),
]


@pytest.mark.parametrize(("answers", "statuses"), EJECTION)
async def test_health_checks_eject_and_readmit(
    pair: tuple[Router, list[Replica], Clock],
    answers: list[Health | BaseException | str],
    statuses: list[str],
) -> None:
    router, (a, b), _ = pair
    seen = []
    for answer in answers:
        a.answer = answer
        await router.monitor.check_once()
        seen.append(router.state(a).status)
    assert seen == statuses
    assert router.state(b).status == "ready"


async def test_an_ejected_replica_gets_no_requests_and_the_model_stays_ready(
    pair: tuple[Router, list[Replica], Clock],
) -> None:
    router, (a, b), _ = pair
    a.answer = REFUSED
    await router.monitor.check_once()
    assert {await pick(router) for _ in range(20)} == {b}
    assert router.health(served(router)).ready
    b.answer = REFUSED
    await router.monitor.check_once()
    assert not router.health(served(router)).ready
    with pytest.raises(UnavailableError) as caught:
        await pick(router)
    assert caught.value.code == "no_healthy_replica"
    assert caught.value.retry_after == 5  # the health interval: when it may be back


# -- the passive circuit breaker ---------------------------------------------------------

# Steps: an outcome reported, or "wait" (the open time passes); the breaker after each.
BREAKER = [
    pytest.param(["fault"] * 3, ["closed", "closed", "open"], id="consecutive faults open it"),
    pytest.param(
        ["fault", "fault", "ok", "fault", "fault"], ["closed"] * 5, id="a success restarts"
    ),
    pytest.param(
        ["fault", "fault", "busy", "busy", "fault"],
        ["closed"] * 4 + ["open"],
        id="busy neither counts nor restarts",
    ),
    pytest.param(
        ["fault"] * 3 + ["wait", "ok"],
        ["closed", "closed", "open", "half_open", "closed"],
        id="the trial's success closes it",
    ),
    pytest.param(
        ["fault"] * 3 + ["wait", "fault", "wait"],
        ["closed", "closed", "open", "half_open", "open", "half_open"],
        id="the trial's fault re-opens it",
    ),
    pytest.param(
        ["fault"] * 3 + ["fault", "fault"],
        ["closed", "closed", "open", "open", "open"],
        id="late faults while open do not extend it",
    ),
]


@pytest.mark.parametrize(("steps", "states"), BREAKER)
async def test_breaker_transitions(steps: list[str], states: list[str]) -> None:
    router, (a, _), clock = build(breaker_faults=3, breaker_open_s=30)
    await router.start()
    state = router.state(a)
    seen = []
    for step in steps:
        if step == "wait":
            clock.now += 30
        else:
            router.report(a, step)  # type: ignore[arg-type]
        seen.append(state.breaker)
    assert seen == states
    await router.close()


async def test_an_open_breaker_sends_requests_elsewhere_until_its_trial() -> None:
    router, (a, b), clock = build(breaker_faults=2, breaker_open_s=30, balance="ordered")
    await router.start()
    router.report(a, "fault")
    router.report(a, "fault")
    assert {await pick(router) for _ in range(5)} == {b}
    clock.now += 29.9
    assert await pick(router) is b
    clock.now += 0.1
    assert await pick(router) is a  # half-open: the trial (ordered: a first when tied)
    await router.close()


async def test_half_open_admits_exactly_one_trial() -> None:
    router, (a,), clock = build(count=1, breaker_faults=1, breaker_open_s=30)
    await router.start()
    router.report(a, "fault")
    clock.now += 30
    async with AsyncExitStack() as trial:
        assert await trial.enter_async_context(router.admit(served(router))) is a
        with pytest.raises(UnavailableError) as caught:
            await pick(router)  # a second request while the trial is in flight
        assert caught.value.code == "no_healthy_replica"
    # The trial ended without an outcome (client gone, 4xx): the next request is the trial.
    async with router.admit(served(router)) as engine:
        router.report(engine, "ok")
    assert router.state(a).breaker == "closed"
    assert {await pick(router) for _ in range(3)} == {a}
    await router.close()


async def test_retry_after_of_an_open_breaker_is_the_time_left() -> None:
    router, (a,), clock = build(count=1, breaker_faults=1, breaker_open_s=30)
    await router.start()
    router.report(a, "fault")
    clock.now += 20.5
    with pytest.raises(UnavailableError) as caught:
        await pick(router)
    assert caught.value.retry_after == 10
    await router.close()


# -- scraped load ------------------------------------------------------------------------


async def test_scraped_load_is_kept_then_goes_stale() -> None:
    router, (a, _), clock = build(kind=Reporting, scrape_interval_s=1.0)
    await router.start()
    state = router.state(a)
    a.stats = LoadStats(waiting=4, running=2, kv_cache_usage=0.5)
    await router.monitor.scrape_once()
    assert state.load() == a.stats
    a.stats = None  # a failed read keeps the last values ...
    await router.monitor.scrape_once()
    clock.now += 3.0
    assert state.load() == LoadStats(waiting=4, running=2, kv_cache_usage=0.5)
    clock.now += 0.1  # ... until they are older than three intervals: unknown, not 0
    assert state.load() == LoadStats(waiting=None, running=None, kv_cache_usage=None)
    (view,) = [v for v in router.replicas() if v.name == "fake:0"]
    assert (view.waiting, view.kv_cache_usage) == (None, None)
    await router.close()


# -- selection ---------------------------------------------------------------------------


async def hold(stack: AsyncExitStack, router: Router, engine: Engine, count: int) -> None:
    """Hold ``count`` permits on ``engine`` (the others excluded)."""
    others = tuple(e for e in served(router).engines if e is not engine)
    for _ in range(count):
        assert await stack.enter_async_context(router.admit(served(router), others)) is engine


# (outstanding held on a and b, load scraped from a, the replica chosen)
SELECTION = [
    pytest.param((1, 0), None, "b", id="least outstanding"),
    pytest.param((0, 2), LoadStats(waiting=3), "b", id="a's waiting requests count"),
    pytest.param((0, 2), LoadStats(waiting=1), "a", id="a little waiting still wins"),
    pytest.param((0, 3), LoadStats(kv_cache_usage=0.9), "b", id="a's full KV cache counts"),
    pytest.param((0, 4), LoadStats(kv_cache_usage=0.9), "a", id="weighed against outstanding"),
    pytest.param((0, 1), LoadStats(), "a", id="unknown load adds nothing"),
]


@pytest.mark.parametrize(("held", "stats", "chosen"), SELECTION)
async def test_least_loaded_with_penalties(
    held: tuple[int, int], stats: LoadStats | None, chosen: str
) -> None:
    router, (a, b), _ = build(kind=Reporting)
    await router.start()
    a.stats = stats
    await router.monitor.scrape_once()
    async with AsyncExitStack() as stack:
        await hold(stack, router, a, held[0])
        await hold(stack, router, b, held[1])
        assert {await pick(router) for _ in range(10)} == {a if chosen == "a" else b}
    await router.close()


async def test_a_busy_replica_is_passed_over_for_busy_s() -> None:
    router, (a, b), clock = build(busy_s=1.0, balance="ordered")
    await router.start()
    router.report(a, "busy")
    async with AsyncExitStack() as stack:
        await hold(stack, router, b, 2)
        assert await pick(router) is b  # busy a goes last, even with less outstanding
        clock.now += 1.0
        assert await pick(router) is a
    assert router.state(a).breaker == "closed"  # busy is no fault
    await router.close()


async def test_ties_are_broken_at_random_or_in_order() -> None:
    router, (a, b), _ = build()
    await router.start()
    assert {await pick(router) for _ in range(40)} == {a, b}
    await router.close()
    router, (a, b), _ = build(balance="ordered")
    await router.start()
    assert {await pick(router) for _ in range(40)} == {a}
    await router.close()


async def test_power_of_two_choices_with_more_than_two_replicas() -> None:
    """Loads 0, 1, 2, 3: the better of a random pair is never the most loaded, and not
    always the least loaded (that would be herding on one replica)."""
    router, engines, _ = build(count=4)
    await router.start()
    counts: dict[Engine, int] = dict.fromkeys(engines, 0)
    async with AsyncExitStack() as stack:
        for load, engine in enumerate(engines):
            await hold(stack, router, engine, load)
        for _ in range(300):
            counts[await pick(router)] += 1
    least, _, _, most = engines
    assert counts[most] == 0
    assert all(counts[e] > 0 for e in engines[:3])
    assert 100 < counts[least] < 200  # in 3 of the 6 pairs: about half
    await router.close()


async def test_a_full_healthy_replica_is_overloaded_not_unhealthy() -> None:
    router, (a, b), _ = build()
    a.capacity = b.capacity = 1
    await router.start()
    router.state(b).checked(REFUSED)
    async with router.admit(served(router)) as engine:
        assert engine is a
        with pytest.raises(OverloadedError):
            await pick(router)
    await router.close()


# -- starting and the background loops ---------------------------------------------------


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_a_replica_that_fails_to_start_is_down_then_started_in_the_background() -> None:
    spec = model(2, health_interval_s=0.01)
    a, b = Replica(spec, 0), Replica(spec, 1)
    a.start_failures = 2
    router = Router([Served(spec, (a, b))])
    await router.start()
    assert [v.status for v in router.replicas()] == ["down", "ready"]
    assert router.get("m").spec.id == "m"  # the model is served meanwhile
    assert {await pick(router) for _ in range(5)} == {b}
    await wait_for(lambda: router.state(a).started)
    assert a.start_failures == 0
    await router.close()


async def test_a_model_none_of_whose_replicas_starts_stops_the_start() -> None:
    spec = model(2)
    a, b = Replica(spec, 0), Replica(spec, 1)
    a.start_failures = b.start_failures = 1
    with pytest.raises(EngineError):
        await Router([Served(spec, (a, b))]).start()


async def test_the_loops_run_while_the_router_runs() -> None:
    spec = model(2, health_interval_s=0.01, scrape_interval_s=0.01, health_timeout_s=1)
    a, b = Reporting(spec, 0), Reporting(spec, 1)
    router = Router([Served(spec, (a, b))])  # the real clock: scraped values stay fresh
    await router.start()
    a.stats = LoadStats(waiting=2)
    a.answer = REFUSED
    await wait_for(lambda: router.state(a).ejected and router.state(a).load().waiting == 2)
    await router.close()
    checks = router.state(a).check_failures
    await asyncio.sleep(0.05)  # stopped: no more checks (a bounded look, not a sync point)
    assert router.state(a).check_failures == checks


def test_replica_state_names_and_defaults() -> None:
    spec = model(1)
    state = ReplicaState(FakeEngine(spec), "m", "fake:0", spec.routing, Clock())
    assert (state.status, state.breaker, state.admissible()) == ("down", "closed", False)
    policy = spec.routing
    assert (policy.health_interval_s, policy.health_timeout_s, policy.eject_after) == (5, 5, 3)
    assert (policy.breaker_faults, policy.breaker_open_s) == (5, 30)
    assert 1 <= policy.scrape_interval_s <= 2
