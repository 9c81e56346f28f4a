"""The model registry on disk: reading ``models/*.toml``, ``--model`` flags, registering.

One TOML file per served model (:class:`medserve.config.ModelSpec`): either the flat form,
engine keys beside ``id`` (one replica), or ``[[replicas]]`` tables, one per engine replica;
``[[fallback]]`` tables, one per fallback engine, go with either. Relative file paths in an
entry are relative to the file. ``medserve models add`` writes entries here too
(:func:`register_gguf`, :func:`register_vllm`).
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

from pydantic import ValidationError

from medserve.config import ENGINE_LISTS, REPLICA_PATHS, ModelSpec, Settings, describe
from medserve.engines import EngineSpec
from medserve.engines.vllm import VllmSpec
from medserve.errors import ConfigError


def load_registry(directory: Path) -> list[ModelSpec]:
    """Read every ``*.toml`` model file in ``directory`` (sorted, so the order is stable).

    Raises ConfigError naming the file and the field (``models.ID.replicas[0].path``).
    """
    if not directory.is_dir():
        raise ConfigError(f"model registry directory not found: {directory}")
    specs = []
    for file in sorted(directory.glob("*.toml")):
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"model file {file}: {exc}") from exc
        name = data.get("id")
        prefix = f"models.{name}" if isinstance(name, str) else "models"
        try:
            spec = ModelSpec.model_validate(data)
        except ValidationError as exc:
            flat = "replicas" not in data
            raise ConfigError(f"model file {file}: {describe(exc, prefix, flat)}") from None
        specs.append(rebase(spec, file.parent))
    return specs


def rebase(spec: ModelSpec, base: Path) -> ModelSpec:
    """``spec`` with the relative file paths of its replicas and fallback engines (and of
    supervised vLLM ``launch`` tables) made relative to ``base``."""
    update: dict[str, tuple[EngineSpec, ...]] = {}
    for field in ENGINE_LISTS:
        engines = []
        for engine in getattr(spec, field):
            paths: dict[str, object] = {}
            for name in REPLICA_PATHS:
                value = getattr(engine, name, None)
                if isinstance(value, Path) and not value.is_absolute():
                    paths[name] = base / value
            if isinstance(engine, VllmSpec) and engine.launch is not None:
                paths["launch"] = engine.launch.rebased(base)
            engines.append(engine.model_copy(update=paths) if paths else engine)
        update[field] = tuple(engines)
    return spec.model_copy(update=update)


def with_state_dir(spec: ModelSpec, state_dir: Path) -> ModelSpec:
    """``spec`` with ``state_dir`` as the state directory of its supervised vLLM replicas
    that name none of their own (replicas and fallback engines)."""
    update: dict[str, tuple[EngineSpec, ...]] = {}
    for field in ENGINE_LISTS:
        engines = []
        for engine in getattr(spec, field):
            if isinstance(engine, VllmSpec) and engine.launch and engine.launch.state_dir is None:
                launch = engine.launch.model_copy(update={"state_dir": state_dir})
                engine = engine.model_copy(update={"launch": launch})
            engines.append(engine)
        update[field] = tuple(engines)
    return spec.model_copy(update=update)


def spec_from_cli(value: str) -> ModelSpec:
    """``--model PATH.gguf`` or ``--model ID=PATH.gguf``: a llama.cpp model with defaults."""
    model_id, sep, path = value.partition("=")
    if not sep:
        path, model_id = value, Path(value).stem.lower()
    try:
        return ModelSpec.model_validate(
            {"id": model_id, "replicas": [{"engine": "llamacpp", "path": Path(path)}]}
        )
    except ValidationError as exc:
        raise ConfigError(f"--model {value}: {describe(exc)}") from None


def served_models(settings: Settings, cli_models: list[str] | None = None) -> list[ModelSpec]:
    """The models to serve: ``--model`` flags, else inline ``models``, else the registry;
    supervised vLLM replicas get the server's ``state_dir`` unless they name their own."""
    if cli_models:
        specs = [spec_from_cli(value) for value in cli_models]
    elif settings.models:
        specs = list(settings.models)
    else:
        specs = load_registry(settings.models_dir)
    if not specs:
        raise ConfigError(
            f"no models to serve: add a TOML file to {settings.models_dir} or pass --model"
        )
    specs = [with_state_dir(spec, settings.state_dir) for spec in specs]
    ids = [spec.id for spec in specs]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ConfigError(f"model ids must be unique; repeated: {', '.join(duplicates)}")
    return specs


def register_gguf(
    models_dir: Path,
    model_id: str,
    weights: Path,
    manifest: Path,
    context_length: int,
    notes: list[str],
    force: bool = False,
) -> Path:
    """Write a registry file for one GGUF artifact; return its path.

    The entry is the flat form (one llama.cpp replica) with ``notes`` as leading comments,
    checked as a :class:`ModelSpec` before anything is written. Raises ConfigError when the
    entry is invalid (a bad id) or the file exists and ``force`` is off.
    """
    lines = [
        *(f"# {note}" for note in notes),
        f"id = {json.dumps(model_id)}",
        'engine = "llamacpp"',
        f"path = {json.dumps(str(weights))}",
        f"manifest = {json.dumps(str(manifest))}",
        f"context_length = {context_length}",
        'chat_template = "gguf"',
        "",
        "[defaults]",
        "# Small and heavily quantized models loop at low temperature without a penalty.",
        "repeat_penalty = 1.1",
        "",
    ]
    return _write_entry(models_dir, model_id, "\n".join(lines), force)


def register_vllm(
    models_dir: Path,
    model_id: str,
    weights: Path,
    python: Path,
    args: list[str],
    notes: list[str],
    force: bool = False,
) -> Path:
    """Write a registry file for one vLLM artifact directory (``medserve quantize --to
    gptq``): one supervised vLLM replica that runs ``python -m
    vllm.entrypoints.openai.api_server --model WEIGHTS ARGS``, with the directory's
    manifest checked before every start. Same checks and errors as :func:`register_gguf`.
    """
    lines = [
        *(f"# {note}" for note in notes),
        f"id = {json.dumps(model_id)}",
        "",
        "[[replicas]]",
        'engine = "vllm"',
        f"manifest = {json.dumps(str(weights / 'manifest.json'))}",
        "",
        "[replicas.launch]",
        f"python = {json.dumps(str(python))}",
        f"model = {json.dumps(str(weights))}",
        f"args = {json.dumps(args)}",
        "# startup_timeout_s = 900  # GPU compile and CUDA-graph capture take minutes",
        "",
    ]
    return _write_entry(models_dir, model_id, "\n".join(lines), force)


def _write_entry(models_dir: Path, model_id: str, text: str, force: bool) -> Path:
    """Check ``text`` as a ModelSpec, then write it as ``models_dir/ID.toml``."""
    try:
        ModelSpec.model_validate(tomllib.loads(text))
    except ValidationError as exc:
        raise ConfigError(f"registry entry: {describe(exc, 'models.' + model_id)}") from None
    target = models_dir / (re.sub(r"[^A-Za-z0-9._-]", "_", model_id) + ".toml")
    if target.exists() and not force:
        raise ConfigError(f"{target} exists (--force to overwrite)")
    models_dir.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    return target
