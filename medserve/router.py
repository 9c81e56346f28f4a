"""Model id to engine: the one place that decides which engine answers a request.

An unknown model is a 404 ``model_not_found``, never a silent substitute: a clinical app
must not get an answer from a model it did not ask for. Replicas, GPU-first policy and
health-based fallback arrive with the vLLM engine; today each model has one engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

from medserve.config import ModelSpec
from medserve.engines import create_engine
from medserve.engines.base import Engine
from medserve.errors import ModelNotFoundError, UnavailableError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Served:
    """A served model: its registry entry and the engine that runs it."""

    spec: ModelSpec
    engine: Engine


class Router:
    """Holds the served models, starts and stops their engines, and resolves ids."""

    def __init__(self, served: list[Served]) -> None:
        self._served = {s.spec.id: s for s in served}
        self._started: list[Engine] = []
        self.load_seconds: dict[str, float] = {}

    @classmethod
    def from_specs(cls, specs: list[ModelSpec]) -> Router:
        return cls([Served(spec, create_engine(spec)) for spec in specs])

    def __iter__(self) -> Iterator[Served]:
        return iter(self._served.values())

    def get(self, model: str) -> Served:
        """The served model named ``model``; 404 if unknown, 503 if not started."""
        served = self._served.get(model)
        if served is None:
            raise ModelNotFoundError(model)
        if served.engine not in self._started:
            raise UnavailableError("The model is not loaded yet.", code="model_not_ready")
        return served

    async def start(self) -> None:
        """Load every model; on a failure, unload what was loaded and re-raise."""
        for served in self._served.values():
            began = time.perf_counter()
            try:
                await served.engine.start()
            except BaseException:
                await self.close()
                raise
            self._started.append(served.engine)
            self.load_seconds[served.spec.id] = time.perf_counter() - began
            log.info("engine started", extra={"model": served.spec.id})

    async def close(self) -> None:
        while self._started:
            await self._started.pop().close()
