"""Inference engines behind one small protocol (see :mod:`medserve.engines.base`).

The registry is explicit, not a plugin scan: only engines named here can run. Each engine
module holds its own registry spec (a pydantic model whose ``engine`` field names it);
:data:`EngineSpec` is their discriminated union, the type of one entry of a model's
``replicas``. Importing a spec is light: heavy libraries (llama_cpp) are imported inside
the engine's functions, only when a model loads.

Adding an engine kind: its module defines ``XSpec`` (with ``engine: Literal["x"]``) and its
engine class; it joins :data:`EngineSpec` and :func:`create_engine` here. Nothing else in
the configuration changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import Field

from medserve.engines.base import Engine
from medserve.engines.fake import FakeEngine, FakeSpec
from medserve.engines.llamacpp import LlamaCppEngine, LlamaCppSpec
from medserve.engines.vllm import VllmEngine, VllmSpec

if TYPE_CHECKING:
    from medserve.config import ModelSpec

EngineSpec = Annotated[LlamaCppSpec | VllmSpec | FakeSpec, Field(discriminator="engine")]
"""One replica of a model: the settings of the engine that runs it, tagged by ``engine``."""

ENGINE_KINDS = ("llamacpp", "vllm", "fake")


def create_engine(model: ModelSpec, replica: EngineSpec) -> Engine:
    """Build the engine for one replica of ``model`` (not started yet)."""
    if isinstance(replica, FakeSpec):
        return FakeEngine(model, replica)
    if isinstance(replica, VllmSpec):
        return VllmEngine(model, replica)
    return LlamaCppEngine(model, replica)
