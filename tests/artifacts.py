"""Stand-in checkpoints and artifact directories with manifests as `medserve quantize` writes
them (source fingerprint and identity included), without quantizing anything."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from medserve import manifest as mf
from medserve.quantize.source import fingerprint


def checkpoint(directory: Path, weights: bytes = b"weights", readme: str = "") -> Path:
    """A directory shaped like a Hugging Face checkpoint: weights, config, tokenizer."""
    directory.mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(weights)
    (directory / "config.json").write_text('{"model_type": "llama"}')
    (directory / "tokenizer.json").write_text('{"model": {}}')
    if readme:
        (directory / "README.md").write_text(readme)
    return directory


def artifact(
    directory: Path,
    source: Path,
    kind: str = "gguf",
    adapter: Path | None = None,
    gguf: Path | None = None,
) -> Path:
    """An artifact quantized (in name) from ``source``; returns its manifest's path.

    ``gguf``: one ``med-q4_k_m.gguf`` file (a copy of ``gguf`` when given, to be loaded
    for real; else stand-in bytes); ``gptq``: a checkpoint-shaped directory. The manifest
    records the source (and adapter) as the pipeline does (``medserve.quantize.pipeline``).
    """
    directory.mkdir(parents=True)
    if kind == "gguf" and gguf is not None:
        shutil.copy(gguf, directory / "med-q4_k_m.gguf")
    elif kind == "gguf":
        (directory / "med-q4_k_m.gguf").write_bytes(b"GGUF" + directory.name.encode())
    else:
        (directory / "model.safetensors").write_bytes(b"gptq" + directory.name.encode())
        (directory / "config.json").write_text('{"quantization_config": {}}')
    found = fingerprint(source)
    prints = fingerprint(adapter) if adapter is not None else None
    found["identity"] = mf.identity_of(found, prints)
    content: dict[str, Any] = {
        "kind": kind,
        "name": "med",
        "source": found,
        "adapter": prints,
        "model": {"context_length": 2048},
        "report": {"artifacts": []},
    }
    return mf.write(directory, content)


def weights_sha256(manifest: Path, file: str | None = None) -> str:
    """What an engine serving the artifact reports: a file's sha256, or the whole table's."""
    data = mf.load(manifest)
    if file is not None:
        return str(data["files"][file]["sha256"])
    return mf.artifact_digest(data)
