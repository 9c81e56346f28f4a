"""Model id to engine: the one place that decides which engine answers a request.

An unknown model is a 404 ``model_not_found``, never a silent substitute: a clinical app
must not get an answer from a model it did not ask for. A model may have several engines
(replicas); the router counts the requests outstanding on each and admits a request to the
one with the fewest that has room (``EngineInfo.capacity``), before any response byte: a
full model is a 503 ``overloaded`` with ``Retry-After``, streaming or not. A caller that
fails over before its commit point asks again with the engines already tried excluded
(``admit(served, exclude=...)``). A model's fallback engines (other weights of the same
checkpoint, :mod:`medserve.fallback`) are a second tier, offered only when no replica can
take the request and the caller allows it (``admit(..., fallback=True)``). Health-based
ejection is not here yet.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Collection, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

from medserve.config import ModelSpec
from medserve.engines import create_engine
from medserve.engines.base import Engine, Health
from medserve.errors import ModelNotFoundError, OverloadedError, UnavailableError
from medserve.fallback import check as check_fallback

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
    """Holds the served models, starts and stops their engines, resolves ids and admits
    requests (:meth:`admit`)."""

    def __init__(self, served: list[Served]) -> None:
        """Raises ConfigError when a model's fallback is not allowed
        (:func:`medserve.fallback.check`)."""
        for s in served:
            check_fallback(s.spec)
        self._served = {s.spec.id: s for s in served}
        self._started: list[Engine] = []
        self._load: dict[int, Load] = {id(e): Load() for s in served for e in s.engines}
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
        """The served model named ``model``; 404 if unknown, 503 if not started."""
        served = self._served.get(model)
        if served is None:
            raise ModelNotFoundError(model)
        if not any(e in self._started for e in served.engines):
            raise UnavailableError("The model is not loaded yet.", code="model_not_ready")
        return served

    def load(self, engine: Engine) -> Load:
        """The router's counts for ``engine`` (one of the served engines)."""
        return self._load[id(engine)]

    @asynccontextmanager
    async def admit(
        self, served: Served, exclude: Collection[Engine] = (), fallback: bool = True
    ) -> AsyncIterator[Engine]:
        """Take a permit on one of ``served``'s engines for the request's whole life.

        Candidates are the started engines not in ``exclude`` (those a failing-over caller
        already tried), in tiers (:meth:`_tiers`): the primary replicas, then, only when
        ``fallback`` is true and no primary candidate has room, the fallback engines. In
        the first tier with room, the engine with the fewest outstanding requests among
        those below their ``EngineInfo.capacity`` (None: unbounded); ties go to the earlier
        engine. The permit is returned when the block exits, however it exits (finished,
        failed, client gone). Raises OverloadedError (503 + ``Retry-After``) when every
        candidate is full, UnavailableError (503) when none is left, before the caller did
        any work.
        """
        candidates = [e for e in served.engines if e in self._started and e not in exclude]
        offered: list[Engine] = []
        room: list[Engine] = []
        for tier in self._tiers(served, candidates, fallback):
            offered += tier
            room = [e for e in tier if _has_room(e, self.load(e))]
            if room:
                break
        if not offered:
            raise UnavailableError("The model is not loaded yet.", code="model_not_ready")
        if not room:
            first = offered[0]
            self.load(first).rejected += 1
            raise OverloadedError(
                "Every slot of this model is busy and its queue is full; retry shortly.",
                retry_after=min(e.info.retry_after_s for e in offered),
            )
        engine = min(room, key=lambda e: self.load(e).outstanding)
        if served.is_fallback(engine):
            log.info(
                "fallback engine admitted",
                extra={"model": served.spec.id, "replica": served.replica_name(engine)},
            )
        load = self.load(engine)
        load.outstanding += 1
        try:
            yield engine
        finally:
            load.outstanding -= 1

    @staticmethod
    def _tiers(
        served: Served, candidates: list[Engine], fallback: bool
    ) -> tuple[list[Engine], ...]:
        """``candidates`` split into the tiers :meth:`admit` tries in order: the primary
        replicas, then the fallback engines when ``fallback`` allows them."""
        primary = [e for e in candidates if not served.is_fallback(e)]
        if not fallback:
            return (primary,)
        return primary, [e for e in candidates if served.is_fallback(e)]

    async def health(self, served: Served) -> Health:
        """The model's health: its engines' added up, with the router's refusals."""
        parts = [await e.health() for e in served.engines]
        return replace(
            parts[0],
            ready=any(h.ready for h in parts),
            running=sum(h.running for h in parts),
            waiting=sum(h.waiting for h in parts),
            rejected=sum(self.load(e).rejected for e in served.engines),
        )

    async def start(self) -> None:
        """Load every engine of every model; on a failure, unload what was loaded and re-raise.

        ``load_seconds[model]`` is the time to load all of the model's replicas.
        """
        for served in self._served.values():
            began = time.perf_counter()
            for index, engine in enumerate(served.engines):
                try:
                    await engine.start()
                except BaseException:
                    await self.close()
                    raise
                self._started.append(engine)
                log.info("engine started", extra={"model": served.spec.id, "replica": index})
            self.load_seconds[served.spec.id] = time.perf_counter() - began

    async def close(self) -> None:
        while self._started:
            await self._started.pop().close()


def _has_room(engine: Engine, load: Load) -> bool:
    capacity = engine.info.capacity
    return capacity is None or load.outstanding < capacity
