"""``manifest.json``: what an artifact directory holds, where it came from, what it cost.

Written last by ``medserve quantize`` (after every file in the directory is final) and read
by ``medserve models add`` and by an engine before it loads weights registered with a
``manifest``: a weights file whose sha256 no longer matches refuses to load, because a
clinical server must not quietly serve weights other than the ones that were evaluated.

Standard library only, and outside :mod:`medserve.quantize`: the server and the engines
import this module, and it must not pull in the ``quant`` extra (nor the quantize package).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

NAME = "manifest.json"
FORMAT = "medserve-artifact/1"
CHUNK = 1 << 20
# The files of a checkpoint (or LoRA adapter) that make the model: its weights, its
# config and its tokenizer. READMEs, training logs and other litter beside them differ
# between copies of one checkpoint and are left out of its identity (:func:`identity_of`).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
MODEL_FILES = frozenset({"config.json", "adapter_config.json", *TOKENIZER_FILES})


class ManifestError(Exception):
    """A manifest is missing, unreadable, or does not match the files it describes."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def tree_files(directory: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every regular file under ``directory``, by POSIX relative path.

    The manifest itself is left out (it cannot hold its own hash); hidden files too
    (editor and OS litter).
    """
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        hidden = any(part.startswith(".") for part in Path(rel).parts)
        if not path.is_file() or rel == NAME or hidden:
            continue
        files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return files


def tree_digest(files: dict[str, dict[str, Any]]) -> str:
    """One sha256 for a set of files: over their sorted ``name sha256`` lines."""
    lines = "".join(f"{name} {meta['sha256']}\n" for name, meta in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def write(directory: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest`` (with the file table filled in now) atomically into ``directory``."""
    manifest = {"format": FORMAT, **manifest, "files": tree_files(directory)}
    target = directory / NAME
    partial = directory / f".{NAME}.partial"
    partial.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(partial, target)
    return target


def load(path: Path) -> dict[str, Any]:
    """The manifest at ``path`` (the file, or a directory holding one)."""
    if path.is_dir():
        path = path / NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"no manifest: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"manifest {path} is unreadable: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError(f"{path} is not a medserve artifact manifest ({FORMAT})")
    if not isinstance(data.get("files"), dict):
        raise ManifestError(f"manifest {path} has no file table")
    return data


def check_file(manifest_path: Path, file: Path) -> str:
    """Raise ManifestError unless ``file`` is listed in the manifest with this exact sha256.

    Returns the digest. ``file`` must lie in the manifest's directory tree.
    """
    manifest = load(manifest_path)
    root = (manifest_path if manifest_path.is_dir() else manifest_path.parent).resolve()
    try:
        rel = file.resolve().relative_to(root).as_posix()
    except ValueError:
        raise ManifestError(f"{file} is not inside the artifact directory {root}") from None
    entry = manifest["files"].get(rel)
    if not isinstance(entry, dict) or "sha256" not in entry:
        raise ManifestError(f"{rel} is not listed in the manifest {manifest_path}")
    actual = sha256_file(file)
    if actual != entry["sha256"]:
        raise ManifestError(
            f"{file} does not match its manifest (sha256 {actual[:16]}..., manifest says "
            f"{str(entry['sha256'])[:16]}...): the file changed after it was quantized and "
            "evaluated; refusing to load it"
        )
    return actual


def check_tree(directory: Path) -> list[str]:
    """Every problem with ``directory`` against its manifest (empty: all files match)."""
    manifest = load(directory)
    problems = []
    for rel, entry in manifest["files"].items():
        path = directory / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(path) != entry.get("sha256"):
            problems.append(f"{rel}: sha256 differs")
    return problems


def model_files(files: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The entries of a checkpoint's file table that make the model: top-level
    ``*.safetensors`` weights, ``config.json``/``adapter_config.json`` and the tokenizer
    files (:data:`MODEL_FILES`)."""
    return {
        name: meta
        for name, meta in files.items()
        if "/" not in name and (name.endswith(".safetensors") or name in MODEL_FILES)
    }


def identity_of(source: dict[str, Any], adapter: dict[str, Any] | None = None) -> str | None:
    """The source checkpoint's identity: 64 hex digits, or None when it cannot be told.

    ``source`` (and ``adapter``, a LoRA merged into it) are fingerprints as ``medserve
    quantize`` records them (``{"files": {name: {"sha256": ...}}, ...}``). The identity is
    the sha256 over ``checkpoint <digest>`` (and ``adapter <digest>``) lines, where each
    digest is :func:`tree_digest` of the :func:`model_files` only, so two copies of one
    checkpoint that differ in a README have the same identity and a GGUF and a GPTQ
    artifact quantized from them can be recognised as the same model. None when a file
    table is missing or holds no ``*.safetensors`` weights.
    """
    lines = []
    for role, fingerprint in (("checkpoint", source), ("adapter", adapter)):
        if fingerprint is None and role == "adapter":
            continue
        files = fingerprint.get("files") if isinstance(fingerprint, dict) else None
        if not isinstance(files, dict):
            return None
        kept = model_files(files)
        if not any(name.endswith(".safetensors") for name in kept):
            return None
        if not all(isinstance(m, dict) and isinstance(m.get("sha256"), str) for m in kept.values()):
            return None
        lines.append(f"{role} {tree_digest(kept)}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def source_identity(manifest: dict[str, Any]) -> str | None:
    """The identity (:func:`identity_of`) of the checkpoint a loaded manifest's artifact was
    quantized from, recomputed from its ``source`` and ``adapter`` file tables; None for a
    manifest that does not record them (written by hand, or by an older tool)."""
    source = manifest.get("source")
    adapter = manifest.get("adapter")
    if not isinstance(source, dict) or not (adapter is None or isinstance(adapter, dict)):
        return None
    return identity_of(source, adapter)


def artifact_digest(manifest: dict[str, Any]) -> str:
    """One sha256 for a whole artifact directory: :func:`tree_digest` of the manifest's
    file table. The weights identity of an artifact served as a directory (a GPTQ
    checkpoint read by vLLM: safetensors, config and tokenizer together)."""
    files: dict[str, dict[str, Any]] = manifest["files"]
    return tree_digest(files)


def declared_digest(path: Path) -> str:
    """:func:`artifact_digest` of the manifest at ``path`` (file or directory); raises
    ManifestError when it is missing or unreadable. Reads the manifest only: the files
    themselves are not hashed (a remote vLLM server's are not even visible here)."""
    return artifact_digest(load(path))
