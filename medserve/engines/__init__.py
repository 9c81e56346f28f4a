"""Inference engines behind one small protocol (see :mod:`medserve.engines.base`).

The registry is an explicit function, not a plugin scan: only engines named here can run,
and each engine's heavy imports happen inside its own module, loaded only when selected.
"""

from __future__ import annotations

from medserve.config import ModelSpec
from medserve.engines.base import Engine


def create_engine(spec: ModelSpec) -> Engine:
    """Build the engine for ``spec`` (not started yet)."""
    if spec.engine == "fake":
        from medserve.engines.fake import FakeEngine

        return FakeEngine(spec)
    if spec.engine == "llamacpp":
        from medserve.engines.llamacpp import LlamaCppEngine

        return LlamaCppEngine(spec)
    raise ValueError(f"unknown engine {spec.engine!r}")  # unreachable: ModelSpec validates it
