"""Model id to engine: the one place that decides which engine answers a request.

An unknown model is a 404 ``model_not_found``, never a silent substitute: a clinical app
must not get an answer from a model it did not ask for. A model has one engine per replica
of its registry entry (:attr:`ModelSpec.replicas`, in order); today the first one answers.
Replica choice, GPU-first policy and health-based fallback arrive with the vLLM engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

from medserve.config import ModelSpec
from medserve.engines import create_engine
from medserve.engines.base import Engine, Health
from medserve.errors import ModelNotFoundError, UnavailableError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Served:
    """A served model: its registry entry and one engine per replica, in ``spec.replicas``
    order (``engines[i]`` runs ``spec.replicas[i]``)."""

    spec: ModelSpec
    engines: tuple[Engine, ...]

    def __post_init__(self) -> None:
        if len(self.engines) != len(self.spec.replicas):
            raise ValueError(f"model {self.spec.id!r}: one engine per replica")

    @property
    def engine(self) -> Engine:
        """The first replica's engine: the one that answers until replica choice exists."""
        return self.engines[0]

    @property
    def kind(self) -> str:
        """Engine kind of :attr:`engine` (``llamacpp``, ``fake``): the one place the web
        layer reads engine identity from. Its source is the replica spec's ``engine`` key,
        which engines also copy into ``EngineInfo.kind``."""
        return self.replica_kind(0)

    async def health(self) -> Health:
        """The model's health: ready when any replica is; load summed over replicas."""
        states = [await engine.health() for engine in self.engines]
        return Health(
            ready=any(h.ready for h in states),
            running=sum(h.running for h in states),
            waiting=sum(h.waiting for h in states),
            rejected=sum(h.rejected for h in states),
        )

    def replica_kind(self, index: int) -> str:
        """Engine kind of ``engines[index]``, as its replica spec names it."""
        return self.spec.replicas[index].engine


class Router:
    """Holds the served models, starts and stops their engines, and resolves ids."""

    def __init__(self, served: list[Served]) -> None:
        self._served = {s.spec.id: s for s in served}
        self._started: list[Engine] = []
        self.load_seconds: dict[str, float] = {}

    @classmethod
    def from_specs(cls, specs: list[ModelSpec]) -> Router:
        return cls(
            [
                Served(spec, tuple(create_engine(spec, replica) for replica in spec.replicas))
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
        if not any(engine in self._started for engine in served.engines):
            raise UnavailableError("The model is not loaded yet.", code="model_not_ready")
        return served

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
