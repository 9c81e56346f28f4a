"""Model id to engine: the one place that decides which engine answers a request.

An unknown model is a 404 ``model_not_found``, never a silent substitute: a clinical app
must not get an answer from a model it did not ask for. A model may have several engines
(replicas). The router admits a request, before any response byte, to a replica that is
started, healthy (:mod:`medserve.health`: not ejected by its health checks, its circuit
breaker not open) and below its ``EngineInfo.capacity``; among those, to the least loaded:
requests outstanding here plus a penalty from the replica's own scraped queue and KV-cache
usage, ties broken at random, the better of two random ones with more than two (power of
two choices), or in replica order when the model's ``routing.balance`` is ``ordered``. A
full model is a 503 ``overloaded`` with ``Retry-After``, streaming or not; a model with no
healthy replica a 503 ``no_healthy_replica``. A caller that fails over before its commit
point asks again with the engines already tried excluded (``admit(served, exclude=...)``)
and reports each attempt's outcome (:meth:`Router.report`). A model's fallback engines
(other weights of the same checkpoint, :mod:`medserve.fallback`) are a second tier, chosen
the same way but offered only when no replica can take the request and the caller allows
it (``admit(..., fallback=True)``).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import AsyncIterator, Collection, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields, replace

from medserve.config import ModelSpec
from medserve.engines import create_engine
from medserve.engines.base import (
    Engine,
    Health,
    LocalHealth,
    PrefixCacheReporter,
    PrefixCacheStats,
)
from medserve.errors import ModelNotFoundError, OverloadedError, UnavailableError
from medserve.fallback import check as check_fallback
from medserve.health import Clock, Monitor, Outcome, ReplicaState, ReplicaView

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Served:
    """A served model: its registry entry and one engine per entry of
    ``spec.engine_specs`` (``spec.replicas``, then ``spec.fallback`` when enabled), in that
    order: ``engines[i]`` runs ``spec.engine_specs[i]``. The first ``len(spec.replicas)``
    are the primary replicas, the rest fallback engines (:meth:`is_fallback`)."""

    spec: ModelSpec
    engines: tuple[Engine, ...]

    def __post_init__(self) -> None:
        if len(self.engines) != len(self.spec.engine_specs):
            raise ValueError(f"model {self.spec.id!r}: one engine per replica and fallback")

    @property
    def engine(self) -> Engine:
        """The first replica's engine: the model's identity (context) for /v1/models."""
        return self.engines[0]

    @property
    def kind(self) -> str:
        """Engine kind of :attr:`engine` (``llamacpp``, ``fake``): the one place the web
        layer reads engine identity from. Its source is the replica spec's ``engine`` key,
        which engines also copy into ``EngineInfo.kind``."""
        return self.replica_kind(0)

    def replica_kind(self, index: int) -> str:
        """Engine kind of ``engines[index]``, as its replica spec names it."""
        return self.spec.engine_specs[index].engine

    def is_fallback(self, engine: Engine) -> bool:
        """Whether ``engine`` (one of :attr:`engines`) is a fallback engine, not a replica."""
        return self.engines.index(engine) >= len(self.spec.replicas)

    def replica_name(self, engine: Engine) -> str:
        """``kind:index`` of one of this model's engines, for audit records and logs."""
        index = self.engines.index(engine)
        return f"{self.replica_kind(index)}:{index}"

    @property
    def primaries(self) -> tuple[Engine, ...]:
        """The engines of ``spec.replicas``."""
        return self.engines[: len(self.spec.replicas)]


@dataclass(slots=True)
class Load:
    """What the router counts per engine: requests admitted and not finished, refusals."""

    outstanding: int = 0
    rejected: int = 0


class Router:
    """Holds the served models, starts and stops their engines (and the health monitor),
    resolves ids, admits requests (:meth:`admit`) and takes their outcomes (:meth:`report`).

    ``rng`` makes the random choices reproducible (tests); ``clock`` (seconds,
    monotonic) times breakers and scraped values.
    """

    def __init__(
        self,
        served: list[Served],
        *,
        rng: random.Random | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        """Raises ConfigError when a model's fallback is not allowed
        (:func:`medserve.fallback.check`)."""
        for s in served:
            check_fallback(s.spec)
        self._served = {s.spec.id: s for s in served}
        self._started: list[Engine] = []
        self._load: dict[int, Load] = {id(e): Load() for s in served for e in s.engines}
        self._states = {
            id(e): ReplicaState(
                e, s.spec.id, s.replica_name(e), s.spec.routing, clock, fallback=s.is_fallback(e)
            )
            for s in served
            for e in s.engines
        }
        self._rng = rng or random.Random()
        self.monitor = Monitor(self._states.values(), self._start_replica)
        self.load_seconds: dict[str, float] = {}

    @classmethod
    def from_specs(cls, specs: list[ModelSpec]) -> Router:
        return cls(
            [
                Served(spec, tuple(create_engine(spec, e) for e in spec.engine_specs))
                for spec in specs
            ]
        )

    def __iter__(self) -> Iterator[Served]:
        return iter(self._served.values())

    def get(self, model: str) -> Served:
        """The served model named ``model``; 404 if unknown, 503 if no replica started."""
        served = self._served.get(model)
        if served is None:
            raise ModelNotFoundError(model)
        if not self.started(served):
            raise UnavailableError("The model is not loaded yet.", code="model_not_ready")
        return served

    def started(self, served: Served) -> tuple[Engine, ...]:
        """``served``'s engines that started, in replica order (healthy or not)."""
        return tuple(e for e in served.engines if self.state(e).started)

    def load(self, engine: Engine) -> Load:
        """The router's counts for ``engine`` (one of the served engines)."""
        return self._load[id(engine)]

    def state(self, engine: Engine) -> ReplicaState:
        """Health, breaker and scraped load of ``engine`` (one of the served engines)."""
        return self._states[id(engine)]

    def report(self, engine: Engine, outcome: Outcome) -> None:
        """One attempt's outcome on ``engine``: ``ok`` (its first chunk came), ``fault``
        (5xx, unreachable, error event, no first event in time) or ``busy`` (503/429
        admission refusal). Client errors and client cancels are not reported."""
        self.state(engine).report(outcome)

    def replicas(self) -> list[ReplicaView]:
        """Every replica of every model as /ready and /metrics show it."""
        return [self.state(e).view(self.load(e).outstanding) for s in self for e in s.engines]

    @asynccontextmanager
    async def admit(
        self, served: Served, exclude: Collection[Engine] = (), fallback: bool = True
    ) -> AsyncIterator[Engine]:
        """Take a permit on one of ``served``'s engines for the request's whole life.

        The engine is chosen by :meth:`_select` among those not in ``exclude`` (the ones a
        failing-over caller already tried), first among the primary replicas and then,
        only when ``fallback`` is true and no replica can take the request, among the
        fallback engines. The permit is returned when the block exits, however it exits
        (finished, failed, client gone); a half-open breaker's trial that reported no
        outcome is given back with it. Raises, before the caller did any work (the primary
        tier's reason when no tier has an engine): UnavailableError (503) when no replica
        is started or none is healthy, OverloadedError (503 + ``Retry-After``) when every
        healthy one is full.
        """
        tiers = [served.primaries]
        if fallback:
            tiers.append(served.engines[len(served.primaries) :])
        engine: Engine | None = None
        refusal: UnavailableError | OverloadedError | None = None
        for tier in tiers:
            try:
                engine = self._select(tier, exclude)
                break
            except (UnavailableError, OverloadedError) as exc:
                refusal = refusal or exc
        if engine is None:
            assert refusal is not None
            if isinstance(refusal, OverloadedError):
                self.load(served.engines[0]).rejected += 1
            raise refusal
        if refusal is not None and served.is_fallback(engine):
            log.info(
                "fallback engine admitted",
                extra={"model": served.spec.id, "replica": served.replica_name(engine)},
            )
        state, load = self.state(engine), self.load(engine)
        trial = state.admitted()
        load.outstanding += 1
        try:
            yield engine
        finally:
            load.outstanding -= 1
            state.released(trial)

    def _select(self, engines: Sequence[Engine], exclude: Collection[Engine]) -> Engine:
        """The engine for the next request among ``engines`` (see the module docstring)."""
        alive = [e for e in engines if self.state(e).started and e not in exclude]
        if not alive:
            raise UnavailableError("The model is not loaded yet.", code="model_not_ready")
        healthy = [e for e in alive if self.state(e).admissible()]
        if not healthy:
            raise UnavailableError(
                "No replica of this model is healthy now; retry shortly.",
                code="no_healthy_replica",
                retry_after=min(self.state(e).retry_after() for e in alive),
            )
        room = [e for e in healthy if _has_room(e, self.load(e))]
        if not room:  # counted in Load.rejected by admit, when no tier has room
            raise OverloadedError(
                "Every slot of this model is busy and its queue is full; retry shortly.",
                retry_after=min(e.info.retry_after_s for e in healthy),
            )
        return self._choose(room)

    def _choose(self, room: list[Engine]) -> Engine:
        """The least loaded of ``room``: a replica that refused as busy lately last, then
        outstanding requests plus the scraped penalty. ``random`` balance: two random
        candidates compared when there are more than two, ties broken at random;
        ``ordered``: every candidate compared, ties to the earlier replica."""

        def key(engine: Engine) -> tuple[bool, float]:
            state = self.state(engine)
            return state.busy(), self.load(engine).outstanding + state.penalty()

        ordered = self.state(room[0]).policy.balance == "ordered"
        if not ordered and len(room) > 2:
            room = self._rng.sample(room, 2)
        best = min(key(e) for e in room)
        ties = [e for e in room if key(e) == best]
        return ties[0] if ordered else self._rng.choice(ties)

    def health(self, served: Served) -> Health:
        """The model's health: its engines' added up (:meth:`replica_health`), with the
        router's refusals. Ready when one engine is ready by its own health and admissible
        by the router's. Synchronous on purpose: it answers from memory, never waiting on
        an engine (a hung vLLM must not make ``/ready`` or ``/metrics`` hang)."""
        parts = [self.replica_health(e) for e in served.engines]
        return replace(
            parts[0],
            ready=any(self.ready(e) for e in served.engines),
            running=sum(h.running for h in parts),
            waiting=sum(h.waiting for h in parts),
            rejected=sum(self.load(e).rejected for e in served.engines),
            unreachable=all(h.unreachable for h in parts),
        )

    def ready(self, engine: Engine) -> bool:
        """Whether ``engine`` is ready by its own health (:meth:`replica_health`) and
        admissible by the router's (started, not ejected, breaker not open)."""
        return self.replica_health(engine).ready and self.state(engine).admissible()

    def kinds(self, served: Served) -> dict[str, tuple[bool, bool]]:
        """Each engine kind of ``served``'s primary replicas: (one of them started, one of
        them :meth:`ready`), for ``medserve_engine_up``/``_ready``."""
        found: dict[str, tuple[bool, bool]] = {}
        for index, engine in enumerate(served.primaries):
            kind = served.replica_kind(index)
            up, ready = found.get(kind, (False, False))
            found[kind] = (up or self.state(engine).started, ready or self.ready(engine))
        return found

    def prefix_cache(self, served: Served) -> PrefixCacheStats | None:
        """The model's prefix cache: the counts of each of its engines (replicas and
        fallback engines) with a :class:`~medserve.engines.base.PrefixCacheReporter` that
        reports one, added up field by field; None when none does. From memory, like
        :meth:`health`: the engines count in their own process (llama.cpp, fake)."""
        parts = [
            stats
            for engine in served.engines
            if isinstance(engine, PrefixCacheReporter)
            and (stats := engine.prefix_cache_stats()) is not None
        ]
        if not parts:
            return None
        names = [f.name for f in fields(PrefixCacheStats)]
        return PrefixCacheStats(**{n: sum(getattr(p, n) for p in parts) for n in names})

    def replica_health(self, engine: Engine) -> Health:
        """``engine``'s health from memory: live for an engine with
        :class:`~medserve.engines.base.LocalHealth` (in-process: llama.cpp, fake);
        otherwise (vLLM) the last active check's answer, or, before the first check,
        ready if started (its ``start`` waited for it to be ready), with ``running`` the
        requests this gateway has in flight there now (the router's own count)."""
        if isinstance(engine, LocalHealth):
            return engine.health_now()
        state = self.state(engine)
        last = state.health or Health(ready=state.started)
        return replace(last, running=self.load(engine).outstanding)

    async def start(self) -> None:
        """Start every engine of every model, then the health monitor.

        A replica that fails to start while another replica of its model started is
        left ``down`` and started again in the background (:class:`Monitor`); a model
        none of whose replicas starts unloads everything loaded and re-raises its first
        replica's error. ``load_seconds[model]`` is the time to start its replicas.
        """
        for served in self._served.values():
            began = time.perf_counter()
            failed: list[BaseException] = []
            for engine in served.engines:
                try:
                    await self._start_replica(self.state(engine))
                except Exception as exc:
                    failed.append(exc)
                    extra = {"model": served.spec.id, "replica": served.replica_name(engine)}
                    log.warning("replica failed to start", extra=extra)
                except BaseException:
                    await self.close()
                    raise
            if len(failed) == len(served.engines):
                await self.close()
                raise failed[0]
            self.load_seconds[served.spec.id] = time.perf_counter() - began
        self.monitor.start()

    async def _start_replica(self, state: ReplicaState) -> None:
        await state.engine.start()
        state.started = True
        self._started.append(state.engine)
        log.info("engine started", extra={"model": state.model, "replica": state.name})

    async def close(self) -> None:
        """Stop the monitor, then close every engine, the last started first (and those
        that never started, which may hold a half-open connection)."""
        await self.monitor.stop()
        never = [s.engine for s in self._states.values() if not s.started]
        while self._started:
            engine = self._started.pop()
            self.state(engine).started = False
            await engine.close()
        for engine in never:
            await engine.close()


def _has_room(engine: Engine, load: Load) -> bool:
    capacity = engine.info.capacity
    return capacity is None or load.outstanding < capacity
