"""GPTQ weight-only quantization with llm-compressor, saved as compressed-tensors.

Why llm-compressor: it is the vLLM project's own tool and compressed-tensors is the format
vLLM loads natively (``quant_method: compressed-tensors``, the WNA16 kernels); it resolves
against the CPU torch and runs on CPU (slowly) or on a GPU when there is one. auto-gptq is
archived and does not import with current transformers.

Every ``Linear`` but ``lm_head`` is quantized to ``bits`` with one symmetric scale per
``group_size`` input columns (or per output channel with ``group_size = -1``). A layer
whose input width is not a multiple of the group size cannot be quantized that way, and
vLLM's kernels could not run it either; that is refused before any calibration starts,
with the largest group size that would work.
"""

from __future__ import annotations

import json
import re
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medserve.quantize import QuantizeError
from medserve.quantize.progress import Stage

# Group sizes vLLM's GPTQ/WNA16 kernels (Marlin, Machete, Exllama) accept, largest first.
KERNEL_GROUP_SIZES = (128, 64, 32)
BITS = (4, 8)
_QUANTIZING = re.compile(r"Quantizing (\d+) module\(s\): (.*)")


def target_widths(model: Any) -> dict[str, int]:
    """Input width of every Linear layer GPTQ will quantize (all but ``lm_head``)."""
    import torch

    return {
        name: int(module.in_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
    }


def check_group_size(widths: dict[str, int], group_size: int) -> None:
    if group_size == -1:
        return
    if group_size < 1:
        raise QuantizeError("--group-size must be a positive number of columns, or -1")
    bad = {name: w for name, w in widths.items() if w % group_size}
    if not bad:
        return
    valid = [g for g in KERNEL_GROUP_SIZES if all(w % g == 0 for w in widths.values())]
    suggestion = f"--group-size {valid[0]}" if valid else "--group-size -1 (per channel)"
    name, width = next(iter(bad.items()))
    raise QuantizeError(
        f"--group-size {group_size}: {len(bad)} of {len(widths)} layers have an input width "
        f"that is not a multiple of it (e.g. {name}: {width} columns). "
        f"Largest valid group size: {suggestion}"
    )


def load_calibration(path: Path) -> list[str]:
    """Texts from JSONL (a ``text`` field per line) or plain text (blank-line paragraphs)."""
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise QuantizeError(f"--calibration: cannot read {path}: {type(exc).__name__}") from None
    texts: list[str] = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                raise QuantizeError(f"--calibration line {number}: not valid JSON") from None
            if not isinstance(item, dict) or not isinstance(item.get("text"), str):
                raise QuantizeError(f"--calibration line {number}: no string `text` field")
            texts.append(item["text"])
    else:
        texts = [p.strip() for p in raw.split("\n\n") if p.strip()]
    if not texts:
        raise QuantizeError("--calibration: the file holds no text")
    return texts


def calibration_ids(
    texts: Sequence[str], tokenizer: Any, samples: int, seq_len: int
) -> list[list[int]]:
    """Up to ``samples`` token sequences of at most ``seq_len``; long texts are split."""
    sequences: list[list[int]] = []
    for text in texts:
        ids = [int(i) for i in tokenizer(text, add_special_tokens=True)["input_ids"]]
        for start in range(0, len(ids), seq_len):
            piece = ids[start : start + seq_len]
            if len(piece) >= 16:
                sequences.append(piece)
        if len(sequences) >= samples:
            break
    if not sequences:
        raise QuantizeError("--calibration: no text long enough to calibrate on (16 tokens)")
    return sequences[:samples]


def quantize(
    model: Any,
    sequences: list[list[int]],
    bits: int,
    group_size: int,
    seq_len: int,
    stage: Stage,
    log: Path,
) -> None:
    """Run GPTQ on ``model`` in place; ``stage`` advances once per quantized layer.

    When llm-compressor fails, its traceback goes to ``log`` and the QuantizeError says
    the exception's type and first line (shapes and layer names, never calibration text)
    and names the log.
    """
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor.entrypoints.oneshot import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from loguru import logger

    if bits not in BITS:
        raise QuantizeError(f"--bits must be one of {', '.join(map(str, BITS))}")
    weights = QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=True,
        strategy="channel" if group_size == -1 else "group",
        group_size=None if group_size == -1 else group_size,
    )
    recipe = GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
        ignore=["lm_head"],
    )
    dataset = Dataset.from_dict(
        {"input_ids": sequences, "attention_mask": [[1] * len(s) for s in sequences]}
    )

    def on_log(message: Any) -> None:
        # llm-compressor logs "Quantizing N module(s): [names]" as each batch is solved.
        found = _QUANTIZING.match(str(message.record["message"]))
        if found:
            stage.advance(int(found.group(1)))
            stage.note(found.group(2).strip("[]' ").split("'")[-1])

    sink = logger.add(on_log, level="INFO")
    try:
        oneshot(
            model=model,
            dataset=dataset,
            recipe=recipe,
            max_seq_length=seq_len,
            num_calibration_samples=len(sequences),
            # The order of the samples changes the result slightly; keep runs repeatable.
            shuffle_calibration_samples=False,
        )
    except (QuantizeError, KeyboardInterrupt):
        raise
    except Exception as exc:
        log.write_text(traceback.format_exc(), encoding="utf-8")
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise QuantizeError(
            f"GPTQ (llm-compressor) failed: {type(exc).__name__}: {first}\n"
            f"The traceback is in {log}"
        ) from None
    finally:
        logger.remove(sink)
    log.unlink(missing_ok=True)
