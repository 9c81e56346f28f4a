"""Per-replica health for the router: active checks, a passive circuit breaker, scraped load.

The router (:mod:`medserve.router`) keeps one :class:`ReplicaState` per engine
(``router.state(engine)``) and admits a request only to a replica that is started, not
ejected and whose breaker lets it through. Three sources feed a state, each with its own
rule; the numbers come from the model's :class:`medserve.config.RoutingPolicy`:

- **Active checks** (:class:`Monitor`, in the background while the router runs): the
  engine's ``health()`` every ``health_interval_s`` (vLLM: ``GET /health``, never a
  generation request), bounded by ``health_timeout_s``. ``eject_after`` consecutive
  failures eject the replica, a refused connection (``Health.unreachable``) at once; the
  first passing check readmits it. A replica whose engine failed to start is ``down`` and
  started again in the background, with a growing pause between tries.
- **Passive circuit breaker**, fed by serving (``router.report(engine, outcome)``) with the
  outcome of each attempt: ``"ok"`` (the first chunk came), ``"fault"`` (5xx, unreachable,
  an error event, no first event in time) or ``"busy"`` (a 503/429 admission refusal).
  ``breaker_faults`` consecutive faults open it; after ``breaker_open_s`` it is half-open
  and lets exactly one trial request through: an ``ok`` closes it, a ``fault`` opens it
  again. ``busy`` is no fault: the replica is only passed over for ``busy_s`` when another
  one can take the request. Client errors and client cancels are never reported.
- **Scraped load** (engines with :class:`medserve.engines.base.LoadReporter`, i.e. vLLM):
  waiting requests and KV-cache usage every ``scrape_interval_s``; a value older than
  three intervals is unknown. Unknown adds nothing to a replica's load; it is never read
  as 0 in what ``/ready`` shows.

A state also keeps the last check's :class:`Health` (:attr:`ReplicaState.health`): what
``/ready`` and ``/metrics`` report for an engine whose health needs I/O (vLLM), so that
they answer from memory and never wait on a hung upstream (:meth:`Router.health
<medserve.router.Router.health>`).

Everything runs on the event loop; the clock is injectable (``time.monotonic`` by default)
so that tests drive a state through time without waiting, and call
:meth:`Monitor.check_once` / :meth:`Monitor.scrape_once` instead of running the loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from medserve.engines.base import Engine, Health, LoadReporter, LoadStats

if TYPE_CHECKING:
    from medserve.config import RoutingPolicy

log = logging.getLogger(__name__)

Outcome = Literal["ok", "fault", "busy"]
OUTCOMES: tuple[Outcome, ...] = ("ok", "fault", "busy")
Breaker = Literal["closed", "open", "half_open"]
BREAKER_STATES: tuple[Breaker, ...] = ("closed", "open", "half_open")
Status = Literal["ready", "ejected", "down"]
STATUSES: tuple[Status, ...] = ("ready", "ejected", "down")
STALE_AFTER = 3  # scrape intervals after which a scraped value is unknown
NO_ANSWER = "the health check timed out or failed"  # Health.detail of a failed check
RESTART_MAX_S = 300.0  # longest pause between two tries to start a replica that is down
Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """One replica as ``/ready``, ``/metrics`` and logs show it (bounded values only).

    ``name`` is ``kind:index`` (``vllm:1``); ``fallback`` whether it is one of the model's
    fallback engines (:mod:`medserve.fallback`), not a replica; ``status`` ``ready``,
    ``ejected`` (failing its health checks) or ``down`` (not started); ``faults`` the
    consecutive faults the breaker counts; ``waiting``/``running``/``kv_cache_usage``
    the last scraped load, None when unknown (not scraped, stale, not exported).
    """

    model: str
    name: str
    kind: str
    fallback: bool
    status: Status
    breaker: Breaker
    outstanding: int
    faults: int
    waiting: int | None
    running: int | None
    kv_cache_usage: float | None


class ReplicaState:
    """Health, breaker and scraped load of one replica (an engine of one model).

    ``started`` is kept by the router (the engine's ``start`` returned); the rest by the
    methods below. ``fallback``: the engine is a fallback engine of its model. Not
    thread-safe: event-loop only, like the router.
    """

    def __init__(
        self,
        engine: Engine,
        model: str,
        name: str,
        policy: RoutingPolicy,
        clock: Clock,
        *,
        fallback: bool = False,
    ) -> None:
        self.engine = engine
        self.model = model
        self.name = name
        self.fallback = fallback
        self.policy = policy
        self._clock = clock
        self.started = False
        self.ejected = False
        self.check_failures = 0  # consecutive failed active checks
        # The last active check's answer (a failed check: not ready, with why); None
        # before the first check.
        self.health: Health | None = None
        self.faults = 0  # consecutive faults reported by serving
        self._opened_at: float | None = None  # when the breaker last opened
        self._trial = False  # the half-open trial request is in flight
        self._busy_until = -math.inf
        self._load = LoadStats()
        self._load_at = -math.inf

    # -- active checks -------------------------------------------------------------------

    def checked(self, health: Health | None) -> None:
        """Take one active check's result: the engine's Health, or None when the check
        failed (timed out, raised)."""
        self.health = health if health is not None else Health(ready=False, detail=NO_ANSWER)
        if health is not None and health.ready:
            if self.ejected:
                log.warning("replica readmitted", extra=self._log())
            self.ejected, self.check_failures = False, 0
            return
        self.check_failures += 1
        refused = health is not None and health.unreachable
        if not self.ejected and (refused or self.check_failures >= self.policy.eject_after):
            self.ejected = True
            extra = {**self._log(), "problem": "refused" if refused else "failed checks"}
            log.warning("replica ejected", extra=extra)

    # -- passive breaker -----------------------------------------------------------------

    @property
    def breaker(self) -> Breaker:
        """``closed``, ``open`` (for ``breaker_open_s`` after it opened), or ``half_open``."""
        if self._opened_at is None:
            return "closed"
        if self._clock() - self._opened_at < self.policy.breaker_open_s:
            return "open"
        return "half_open"

    def report(self, outcome: Outcome) -> None:
        """One attempt's outcome (see the module docstring)."""
        if outcome == "busy":
            self._busy_until = self._clock() + self.policy.busy_s
            return
        if outcome == "ok":
            if self._opened_at is not None:
                log.warning("replica breaker closed", extra=self._log())
            self.faults, self._opened_at = 0, None
            return
        self.faults += 1
        state, limit = self.breaker, self.policy.breaker_faults
        if state == "half_open" or (state == "closed" and self.faults >= limit):
            self._opened_at = self._clock()
            log.warning("replica breaker opened", extra={**self._log(), "faults": self.faults})

    def admissible(self) -> bool:
        """Whether the router may admit a request here now: started, not ejected, and the
        breaker closed, or half-open with its one trial not taken yet."""
        if not self.started or self.ejected:
            return False
        state = self.breaker
        return state == "closed" or (state == "half_open" and not self._trial)

    def admitted(self) -> bool:
        """Note that a request was admitted here; True if it is the half-open trial (give
        that back to :meth:`released` when its permit ends)."""
        if self.breaker == "half_open" and not self._trial:
            self._trial = True
            return True
        return False

    def released(self, trial: bool) -> None:
        """A permit ended. A trial that reported no outcome (client gone, client error,
        busy) frees the trial slot: the next request may be the trial."""
        if trial:
            self._trial = False

    def busy(self) -> bool:
        """Whether the replica refused a request as full less than ``busy_s`` ago."""
        return self._clock() < self._busy_until

    def retry_after(self) -> int:
        """Seconds until this replica may be admissible again (for ``Retry-After``)."""
        wait = self.policy.health_interval_s
        if self._opened_at is not None and not self.ejected:
            wait = self._opened_at + self.policy.breaker_open_s - self._clock()
        return max(1, math.ceil(wait))

    # -- scraped load --------------------------------------------------------------------

    def scraped(self, stats: LoadStats | None) -> None:
        """One scrape's result; None (the read failed) keeps the last values to go stale."""
        if stats is not None:
            self._load, self._load_at = stats, self._clock()

    def load(self) -> LoadStats:
        """The last scraped load, all-unknown once older than STALE_AFTER intervals."""
        if self._clock() - self._load_at > STALE_AFTER * self.policy.scrape_interval_s:
            return LoadStats()
        return self._load

    def penalty(self) -> float:
        """Extra load (in outstanding requests) from the scraped load: waiting requests
        times ``waiting_weight`` plus KV-cache usage times ``kv_weight``; unknown adds 0."""
        load, p = self.load(), self.policy
        return p.waiting_weight * (load.waiting or 0) + p.kv_weight * (load.kv_cache_usage or 0.0)

    # -- views ---------------------------------------------------------------------------

    @property
    def status(self) -> Status:
        return "down" if not self.started else "ejected" if self.ejected else "ready"

    def view(self, outstanding: int) -> ReplicaView:
        load = self.load()
        return ReplicaView(
            model=self.model,
            name=self.name,
            kind=self.name.split(":", 1)[0],
            fallback=self.fallback,
            status=self.status,
            breaker=self.breaker,
            outstanding=outstanding,
            faults=self.faults,
            waiting=load.waiting,
            running=load.running,
            kv_cache_usage=load.kv_cache_usage,
        )

    def _log(self) -> dict[str, str]:
        return {"model": self.model, "replica": self.name}


class Monitor:
    """Runs the active checks and load scrapes of every replica, one loop per model, and
    restarts replicas that are down (``start``: the router's, which marks them started).

    :meth:`start` and :meth:`stop` bracket the loops (the router's own start and close);
    :meth:`check_once` and :meth:`scrape_once` are one round of each, for tests.
    """

    def __init__(
        self, states: Iterable[ReplicaState], start: Callable[[ReplicaState], Awaitable[None]]
    ) -> None:
        self._models: dict[str, list[ReplicaState]] = {}
        for state in states:
            self._models.setdefault(state.model, []).append(state)
        self._start = start
        self._tasks: list[asyncio.Task[None]] = []

    async def check_once(self) -> None:
        """Check every started replica once (concurrently, each bounded in time)."""
        await asyncio.gather(*(_check(s) for group in self._models.values() for s in group))

    async def scrape_once(self) -> None:
        """Read the load of every started replica that reports one, once."""
        await asyncio.gather(*(_scrape(s) for group in self._models.values() for s in group))

    def start(self) -> None:
        """Start the loops (on the running event loop). Idempotent."""
        if self._tasks:
            return
        for group in self._models.values():
            policy = group[0].policy
            checks = _every(policy.health_interval_s, _check, group)
            self._tasks.append(asyncio.create_task(checks))
            if any(isinstance(s.engine, LoadReporter) for s in group):
                scrapes = _every(policy.scrape_interval_s, _scrape, group)
                self._tasks.append(asyncio.create_task(scrapes))
            for state in group:
                if not state.started:
                    self._tasks.append(asyncio.create_task(self._revive(state)))

    async def stop(self) -> None:
        """Cancel the loops and wait for them to end."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _revive(self, state: ReplicaState) -> None:
        """Start a replica that is down, pausing longer after each failure (from
        ``health_interval_s``, doubling, at most RESTART_MAX_S)."""
        pause = state.policy.health_interval_s
        while not state.started:
            await asyncio.sleep(pause)
            try:
                await self._start(state)
            except Exception as exc:  # any failure to start: try again later
                extra = {"model": state.model, "replica": state.name, "error": type(exc).__name__}
                log.warning("replica still down", extra=extra)
                pause = min(pause * 2, RESTART_MAX_S)


async def _every(
    seconds: float, one: Callable[[ReplicaState], Awaitable[None]], group: list[ReplicaState]
) -> None:
    """Run ``one`` on every replica of ``group`` (concurrently), pausing ``seconds``
    between rounds, until cancelled."""
    while True:
        await asyncio.sleep(seconds)
        await asyncio.gather(*(one(s) for s in group))


async def _check(state: ReplicaState) -> None:
    if not state.started:
        return
    health: Health | None = None
    try:
        async with asyncio.timeout(state.policy.health_timeout_s):
            health = await state.engine.health()
    except TimeoutError:
        pass
    except Exception as exc:  # an engine's health() must not stop the loop: a failure
        log.warning(
            "replica health check failed",
            extra={"model": state.model, "replica": state.name, "error": type(exc).__name__},
        )
    state.checked(health)


async def _scrape(state: ReplicaState) -> None:
    engine = state.engine
    if not state.started or not isinstance(engine, LoadReporter):
        return
    stats: LoadStats | None = None
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(state.policy.health_timeout_s):
            stats = await engine.load_stats()
    state.scraped(stats)
