"""The input: a local HF checkpoint directory, and optionally a PEFT LoRA adapter merged in.

Never a hub id: a string that is not an existing directory is refused with a message that
says so, and every transformers/peft load passes ``local_files_only``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from medserve.manifest import TOKENIZER_FILES, tree_digest, tree_files
from medserve.quantize import QuantizeError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def check_checkpoint(path: Path) -> dict[str, Any]:
    """Refuse anything but a local checkpoint directory; return its ``config.json``."""
    if not path.exists():
        raise QuantizeError(
            f"{path} does not exist. SRC must be a local checkpoint directory; medserve never "
            "downloads models (fetch it on a connected machine and copy it in)"
        )
    if not path.is_dir() or not (path / "config.json").is_file():
        raise QuantizeError(f"{path} is not a Hugging Face checkpoint directory (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise QuantizeError(
            f"{path} holds no *.safetensors weights (pickled .bin checkpoints can run code "
            "when loaded; convert them to safetensors on a trusted machine first)"
        )
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise QuantizeError(f"{path} has no tokenizer (tokenizer.json or tokenizer.model)")
    try:
        config: dict[str, Any] = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise QuantizeError(f"{path}/config.json is unreadable: {exc}") from None
    return config


def check_adapter(path: Path) -> dict[str, Any]:
    if not (path / "adapter_config.json").is_file():
        raise QuantizeError(f"--lora {path}: not a PEFT adapter directory (no adapter_config.json)")
    if not any(path.glob("adapter_model*.safetensors")):
        raise QuantizeError(f"--lora {path}: no adapter_model.safetensors")
    config: dict[str, Any] = json.loads((path / "adapter_config.json").read_text("utf-8"))
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise QuantizeError(f"--lora {path}: peft_type {config.get('peft_type')}, not LORA")
    return config


def fingerprint(path: Path) -> dict[str, Any]:
    """sha256 of every file of a checkpoint or adapter, and one digest over all of them."""
    files = tree_files(path)
    return {"path": str(path.resolve()), "sha256": tree_digest(files), "files": files}


def dtype_of(config: dict[str, Any]) -> str:
    """The checkpoint's stored dtype name (transformers 5 writes ``dtype``, 4 ``torch_dtype``)."""
    value = config.get("dtype") or config.get("torch_dtype") or "float32"
    return str(value)


def merge_lora(source: Path, adapter: Path, out: Path) -> None:
    """Merge ``adapter`` into ``source`` with peft and save a plain checkpoint to ``out``.

    The merge runs in float32 (W + scale * B @ A without bf16 rounding of the sum), and the
    result is stored in the checkpoint's own dtype, so it is the same size as the source.
    A tokenizer saved with the adapter (fine-tunes that added tokens) wins over the base's.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    stored = dtype_of(json.loads((source / "config.json").read_text(encoding="utf-8")))
    base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, local_files_only=True)
    try:
        model = PeftModel.from_pretrained(base, adapter, local_files_only=True)
    except (ValueError, RuntimeError, KeyError) as exc:
        # Shape mismatches (an adapter for another base model) land here.
        raise QuantizeError(
            f"--lora {adapter}: does not fit this base model ({type(exc).__name__}: {exc})"
        ) from None
    merged = model.merge_and_unload()
    target = getattr(torch, stored, torch.float32)
    if isinstance(target, torch.dtype):
        merged = merged.to(target)
    merged.save_pretrained(out, safe_serialization=True)
    own = any((adapter / name).is_file() for name in ("tokenizer.json", "tokenizer.model"))
    folder = adapter if own else source
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copy2(folder / name, out / name)
