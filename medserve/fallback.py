"""GPU → CPU fallback: when a model's other weights may answer, and the check that allows it.

A model's ``fallback`` engines (:class:`medserve.config.ModelSpec`) run *other weights* of the
same model: typically the GGUF on llama.cpp (CPU) of the checkpoint whose GPTQ the vLLM
replicas (GPU) serve. Their answers differ from the replicas' (another quantization, another
kernel), so fallback is never implicit:

- **Explicit per model**: only engines listed under ``fallback`` are fallback engines;
  ``fallback_enabled = false`` keeps the entry but starts none of them.
- **Same source checkpoint**: every replica and every fallback engine names its artifact
  manifest (``manifest``), and all manifests name the same source checkpoint
  (:func:`medserve.manifest.source_identity`: the sha256 over the checkpoint's weights,
  config and tokenizer files, and a merged LoRA adapter's). :func:`check` refuses anything
  else with a ConfigError before any engine loads, including a manifest too old to say.
- **Last resort**: the router offers a fallback engine only when no replica can take the
  request (not started, already tried, full; :meth:`medserve.router.Router.admit`).
- **Forbiddable per key**: a key created with ``medserve keys create --no-fallback`` never
  gets a fallback answer; it gets the replicas' last fault (503 + ``Retry-After`` when they
  were full or unreachable) instead.
- **Announced and audited**: an answer from a fallback engine carries
  ``X-Medserve-Fallback`` (every answer carries ``X-Medserve-Engine``), and every audit
  record of a generation says ``fallback`` (true/false) and ``weights_sha256``, the
  answering artifact's (:attr:`medserve.engines.base.EngineInfo.weights_sha256`).
"""

from __future__ import annotations

from pathlib import Path

from medserve.config import ModelSpec
from medserve.errors import ConfigError
from medserve.manifest import ManifestError, load, source_identity

ENGINE_HEADER = "X-Medserve-Engine"
FALLBACK_HEADER = "X-Medserve-Fallback"


def check(spec: ModelSpec) -> str | None:
    """The source checkpoint identity shared by all of ``spec``'s engines, or None for a
    model without (enabled) fallback engines, which needs no manifests.

    Reads each engine's manifest (small JSON files; no weights are hashed here). Raises
    ConfigError naming the model and the field (``models.ID.fallback[0].manifest``) when
    an engine has no manifest, a manifest is unreadable or records no source checkpoint,
    or two manifests name different checkpoints.
    """
    if not spec.fallback or not spec.fallback_enabled:
        return None
    found: list[tuple[str, str]] = []  # (field, identity)
    for field, engines in (("replicas", spec.replicas), ("fallback", spec.fallback)):
        for index, engine in enumerate(engines):
            name = f"models.{spec.id}.{field}[{index}].manifest"
            manifest = getattr(engine, "manifest", None)
            if not isinstance(manifest, Path):
                raise ConfigError(
                    f"{name}: model {spec.id!r} has fallback engines, so every replica and "
                    "fallback engine needs the manifest of the artifact it serves (GPU -> "
                    "CPU fallback is allowed only between artifacts of one source checkpoint)"
                )
            try:
                identity = source_identity(load(manifest))
            except ManifestError as exc:
                raise ConfigError(f"{name}: {exc}") from None
            if identity is None:
                raise ConfigError(
                    f"{name}: {manifest} does not record its source checkpoint's files, so "
                    f"model {spec.id!r} cannot fall back between artifacts (quantize it again "
                    "with this medserve, or remove `fallback`)"
                )
            found.append((name, identity))
    first_name, first = found[0]
    for name, identity in found[1:]:
        if identity != first:
            raise ConfigError(
                f"{name}: model {spec.id!r}: this artifact was quantized from another source "
                f"checkpoint ({identity[:12]}...) than {first_name} ({first[:12]}...); "
                "fallback is allowed only between artifacts of the same checkpoint"
            )
    return first
