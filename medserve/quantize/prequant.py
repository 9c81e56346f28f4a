"""Sources that are, or claim to be, already quantized: inspected before any work.

``medserve quantize`` starts from floating-point weights. A checkpoint can say otherwise
in two places, and both are read up front, before the baseline evaluation or the
converter run:

- ``config.json``'s ``quantization_config`` (or the older ``compression_config``): what a
  tool *claims*. A claim can be stale: loading a GGUF into transformers and saving the
  result leaves ``{"quant_method": "gguf"}`` beside plain float32 weights, and llama.cpp's
  converter then stops with ``NotImplementedError``.
- The safetensors headers (names, dtypes and shapes; no weights are read): what the
  weights *are*. bitsandbytes leaves ``uint8`` weights with ``absmax``/``quant_state``
  (4-bit) or ``int8`` weights with ``SCB`` (8-bit); GPTQ and AWQ ``qweight``/``qzeros``/
  ``scales``; compressed-tensors ``weight_packed``/``weight_scale``; FP8 ``float8_e4m3fn``
  weights with ``weight_scale`` or ``weight_scale_inv``; HQQ ``W_q``.

What happens (:class:`Plan`):

- weights all float, a claim present: ``clean``. The converter and transformers read a
  staging view in the work directory (symlinks to the user's files, ``config.json``
  without the claim); the user's checkpoint is never modified.
- FP8 weights with their scales: ``dequantize-fp8``. ``W = w.float() * scale`` (per
  tensor, per output channel, or per block of ``weight_block_size``), as transformers'
  and llama.cpp's own FP8 code does, written in the config's dtype into the work
  directory; everything after (baseline, conversion) starts from that copy.
- compressed-tensors integer weights (``pack-quantized`` as medserve's own ``--to gptq``
  writes, ``int-quantized``), under their ``quantization_config``:
  ``dequantize-compressed``. transformers loads them with ``CompressedTensorsConfig(
  dequantize=True)`` (compressed-tensors' own unpacking), and the float weights are saved
  as a plain checkpoint in the work directory. The report then measures the loss against
  those dequantized weights, which already carry the first quantization's loss.
- anything else quantized: refused before any work, saying what was found and what to
  pass instead. Dequantizing 4-bit formats gives back the rounded weights, not the model
  that was fine-tuned, and quantizing those again compounds two losses.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medserve.quantize import EXTRA_HINT, QuantizeError

FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
# Non-float dtypes that carry no quantized data (position ids, masks).
NEUTRAL_DTYPES = frozenset({"I64", "BOOL"})
FP8_DTYPES = frozenset({"F8_E4M3", "F8_E5M2"})
# Tensors that only exist beside FP8 weights and are not needed once they are float.
_FP8_EXTRAS = (".input_scale", ".activation_scale", ".k_scale", ".v_scale", ".qscale_act")

PASS_BASE = (
    "pass the unquantized base checkpoint instead (the float16/bfloat16 model the "
    "fine-tune started from) plus the adapter with --lora"
)
PASS_FLOAT = (
    "pass the floating-point checkpoint it was quantized from instead (plus any "
    "fine-tuning adapter with --lora)"
)


@dataclass(frozen=True)
class Tensor:
    """One tensor's header entry: safetensors dtype name (``F32``, ``U8``...) and shape."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    """What to do about the source's quantization before anything reads it.

    ``action``: ``none`` (a plain float checkpoint), ``clean`` (a stale or false claim:
    read a view without it), ``dequantize-fp8`` or ``dequantize-compressed``.
    ``claimed``: the config's ``quant_method`` (``None`` when it has none). ``found``: what
    the weights are, in words.
    """

    action: str
    claimed: str | None
    found: str
    config_key: str | None = None
    block_size: tuple[int, ...] | None = None

    def describe(self) -> str:
        """One line for the progress display and the manifest."""
        if self.action == "clean":
            return (
                f"config.json claims quant_method {self.claimed!r} but the weights are "
                f"{self.found}: the claim is ignored (the converter reads a copy of "
                f"config.json without {self.config_key}; the source is unchanged)"
            )
        if self.action == "dequantize-fp8":
            return f"the weights are {self.found}: dequantized to float with their scales"
        if self.action == "dequantize-compressed":
            return (
                f"the weights are {self.found}: dequantized to float by compressed-tensors; "
                "the report compares against these dequantized weights, not the model "
                "they were quantized from (whose quality is lost to this report)"
            )
        return f"the weights are {self.found}"

    def recorded(self) -> dict[str, Any]:
        return {
            "claimed": self.claimed,
            "found": self.found,
            "action": self.action,
            "detail": self.describe(),
        }


def read_headers(source: Path) -> dict[str, Tensor]:
    """Name -> :class:`Tensor` for every tensor of every ``*.safetensors`` file.

    Only the JSON headers are read (the format's first 8 bytes give the header length),
    so this costs milliseconds whatever the model's size.
    """
    tensors: dict[str, Tensor] = {}
    for file in sorted(source.glob("*.safetensors")):
        try:
            with file.open("rb") as f:
                size = int.from_bytes(f.read(8), "little")
                if not 2 <= size <= 100_000_000:
                    raise ValueError("header size out of range")
                header = json.loads(f.read(size))
        except (OSError, ValueError) as exc:
            raise QuantizeError(f"{file} is not a readable safetensors file ({exc})") from None
        for name, entry in header.items():
            if name == "__metadata__" or not isinstance(entry, dict):
                continue
            tensors[name] = Tensor(str(entry.get("dtype")), tuple(entry.get("shape", ())))
    return tensors


def claim_of(config: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None, str | None]:
    """(quant_method, the whole entry, its config key), or Nones when nothing is claimed."""
    for key in ("quantization_config", "compression_config"):
        entry = config.get(key)
        if isinstance(entry, dict) and entry:
            method = entry.get("quant_method") or entry.get("quant_algo")
            if method is None and (entry.get("load_in_4bit") or entry.get("load_in_8bit")):
                method = "bitsandbytes"
            return (str(method) if method is not None else "unnamed"), entry, key
    return None, None, None


def inspect(source: Path, config: dict[str, Any]) -> Plan:
    """Decide from ``config.json`` and the safetensors headers; refuse what cannot be used.

    Raises QuantizeError (nothing has been written yet) for quantized weights medserve
    cannot turn back into float correctly, naming what was found and what to pass instead.
    """
    claimed, entry, key = claim_of(config)
    tensors = read_headers(source)
    said = f" (config.json: quant_method {claimed!r})" if claimed else ""

    def refuse(found: str, instead: str) -> QuantizeError:
        return QuantizeError(
            f"{source} holds already-quantized weights: {found}{said}. medserve quantizes "
            f"from floating-point weights; {instead}"
        )

    names = list(tensors)

    def ending(*suffixes: str) -> list[str]:
        return [n for n in names if n.endswith(suffixes)]

    if ending(".absmax", ".quant_map", ".nested_absmax") or any(
        ".quant_state.bitsandbytes__" in n for n in names
    ):
        raise refuse(
            "bitsandbytes 4-bit (NF4/FP4) tensors (uint8 weights with absmax/quant_state), "
            "as QLoRA training leaves them",
            PASS_BASE,
        )
    if ending(".SCB", ".weight_format"):
        raise refuse("bitsandbytes 8-bit tensors (int8 weights with SCB)", PASS_BASE)
    if ending(".qweight"):
        kind = "AWQ" if claimed == "awq" or not ending(".g_idx") else "GPTQ"
        raise refuse(f"{kind} tensors (packed int32 qweight/qzeros with scales)", PASS_FLOAT)
    integer_scaled = [
        n for n in ending(".weight") if tensors[n].dtype == "I8" and f"{n}_scale" in tensors
    ]
    if ending(".weight_packed") or (claimed == "compressed-tensors" and integer_scaled):
        found = (
            "compressed-tensors integer weights (weight_packed or int8 weight with "
            "weight_scale, as medserve's own --to gptq and llm-compressor write them)"
        )
        if claimed != "compressed-tensors":
            raise refuse(f"{found} under no compressed-tensors quantization_config", PASS_FLOAT)
        if importlib.util.find_spec("compressed_tensors") is None:
            raise refuse(
                f"{found}; reading them needs compressed-tensors", f"{EXTRA_HINT}, or " + PASS_FLOAT
            )
        return Plan("dequantize-compressed", claimed, found, config_key=key)
    if ending(".W_q"):
        raise refuse("HQQ tensors (W_q with meta)", PASS_FLOAT)
    fp8 = [n for n, t in tensors.items() if t.dtype in FP8_DTYPES]
    if fp8:
        return _fp8_plan(tensors, fp8, claimed, entry, key, refuse)
    odd = [n for n, t in tensors.items() if t.dtype not in FLOAT_DTYPES | NEUTRAL_DTYPES]
    if odd:
        example = odd[0]
        raise refuse(
            f"{len(odd)} tensors of non-float type, e.g. {example} ({tensors[example].dtype})",
            PASS_FLOAT,
        )
    dtypes = sorted({t.dtype for t in tensors.values() if t.dtype in FLOAT_DTYPES})
    found = "/".join(_DTYPE_WORDS.get(d, d) for d in dtypes) or "float"
    if claimed is None:
        return Plan("none", None, found)
    return Plan("clean", claimed, found, config_key=key)


_DTYPE_WORDS = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _fp8_plan(
    tensors: dict[str, Tensor],
    fp8: list[str],
    claimed: str | None,
    entry: dict[str, Any] | None,
    key: str | None,
    refuse: Callable[[str, str], QuantizeError],
) -> Plan:
    block = (entry or {}).get("weight_block_size")
    # compressed-tensors FP8 block scheme: config_groups.*.weights.block_structure.
    for group in ((entry or {}).get("config_groups") or {}).values():
        if block is None and isinstance(group, dict):
            block = (group.get("weights") or {}).get("block_structure")
    block_size = tuple(int(b) for b in block) if isinstance(block, list) and block else None
    for name in fp8:
        weight = tensors[name]
        scale = tensors.get(f"{name}_scale_inv") or tensors.get(f"{name}_scale")
        if scale is None or not name.endswith(".weight"):
            raise refuse(
                f"FP8 tensor {name} without a weight_scale or weight_scale_inv beside it",
                PASS_FLOAT,
            )
        if fp8_scale_shape(weight.shape, scale.shape, block_size) is None:
            raise refuse(
                f"FP8 tensor {name} {list(weight.shape)} with a scale of shape "
                f"{list(scale.shape)} that fits no per-tensor, per-channel or block layout",
                PASS_FLOAT,
            )
    return Plan(
        "dequantize-fp8",
        claimed,
        f"FP8 ({len(fp8)} float8 tensors with scales)",
        config_key=key,
        block_size=block_size,
    )


def fp8_scale_shape(
    weight: tuple[int, ...], scale: tuple[int, ...], block: tuple[int, ...] | None
) -> tuple[int, ...] | None:
    """The block each scale entry covers, or None when the scale's shape fits no layout.

    Per tensor: a scale of one element -> the whole weight. Per output channel: ``[out]``
    or ``[out, 1]`` -> ``(1, in)``. Per block (DeepSeek-V3/Qwen3 FP8,
    ``weight_block_size: [128, 128]``): ``[ceil(out/b0), ceil(in/b1)]`` -> ``(b0, b1)``.
    """
    if len(weight) != 2:
        return None
    rows, cols = weight
    if math.prod(scale) == 1:
        return (rows, cols)
    if scale in ((rows,), (rows, 1)):
        return (1, cols)
    blocks = None if block is None else (-(-rows // block[0]), -(-cols // block[-1]))
    if block is not None and len(block) == 2 and scale == blocks:
        return block
    return None


def clean_view(source: Path, config: dict[str, Any], key: str, out: Path) -> Path:
    """``out``: symlinks to every file of ``source`` and a ``config.json`` without ``key``."""
    out.mkdir(parents=True)
    for item in source.iterdir():
        if item.name != "config.json":
            os.symlink(item.resolve(), out / item.name)
    cleaned = {k: v for k, v in config.items() if k != key}
    (out / "config.json").write_text(json.dumps(cleaned, indent=2) + "\n", encoding="utf-8")
    return out


def dequantize_fp8(source: Path, config: dict[str, Any], plan: Plan, out: Path) -> Path:
    """Write ``source`` with every FP8 weight multiplied out by its scale into ``out``.

    The result is stored in the config's dtype (float32 when it names none); scale and
    activation-scale tensors are dropped, the shard layout and index are kept, and the
    other files are symlinked. Shapes were checked by :func:`inspect`.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from medserve.quantize.source import dtype_of

    target = getattr(torch, dtype_of(config), torch.float32)
    if not isinstance(target, torch.dtype) or not target.is_floating_point:
        target = torch.float32
    out.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    for file in sorted(source.glob("*.safetensors")):
        tensors: dict[str, Any] = {}
        with safe_open(str(file), framework="pt") as f:
            names = list(f.keys())
            present = set(names)
            for name in names:
                if name.endswith(("_scale", "_scale_inv", *_FP8_EXTRAS)):
                    base = name.removesuffix("_scale_inv").removesuffix("_scale")
                    if base in present or name.endswith(_FP8_EXTRAS):
                        continue
                tensor = f.get_tensor(name)
                if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                    scale_name = f"{name}_scale_inv" if f"{name}_scale_inv" in present else None
                    scale_name = scale_name or f"{name}_scale"
                    tensor = _fp8_to_float(tensor, f.get_tensor(scale_name), plan.block_size)
                tensors[name] = tensor.to(target).contiguous()
        save_file(tensors, str(out / file.name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file.name))
    index = source / "model.safetensors.index.json"
    for item in source.iterdir():
        if item.suffix == ".safetensors" or item.name in ("config.json", index.name):
            continue
        os.symlink(item.resolve(), out / item.name)
    if index.is_file():
        data = json.loads(index.read_text(encoding="utf-8"))
        data["weight_map"] = weight_map
        (out / index.name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    cleaned = {k: v for k, v in config.items() if k != plan.config_key}
    (out / "config.json").write_text(json.dumps(cleaned, indent=2) + "\n", encoding="utf-8")
    return out


def _fp8_to_float(weight: Any, scale: Any, block: tuple[int, ...] | None) -> Any:
    """``weight.float() * scale`` with the scale expanded to the weight's layout."""
    rows, cols = weight.shape
    each = fp8_scale_shape(tuple(weight.shape), tuple(scale.shape), block)
    if each is None:  # checked up front; the file changed since
        raise QuantizeError(f"FP8 scale of shape {list(scale.shape)} fits no layout")
    if each == (rows, cols):
        s = scale.float().reshape(1, 1)
    elif each == (1, cols):
        s = scale.float().reshape(rows, 1)
    else:
        s = scale.float().repeat_interleave(each[0], 0).repeat_interleave(each[1], 1)
        s = s[:rows, :cols]
    return weight.float() * s


def dequantize_compressed(source: Path, config: dict[str, Any], plan: Plan, out: Path) -> Path:
    """Load a compressed-tensors checkpoint dequantized, save it as a plain float checkpoint.

    transformers with ``CompressedTensorsConfig(dequantize=True)`` unpacks and scales the
    weights (compressed-tensors' own code); they are copied into a model built from the
    config without ``quantization_config`` (every parameter must be found), saved in the
    config's dtype, and the tokenizer and other files are symlinked.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, CompressedTensorsConfig

    from medserve.quantize.source import dtype_of

    target = getattr(torch, dtype_of(config), torch.float32)
    if not isinstance(target, torch.dtype) or not target.is_floating_point:
        target = torch.float32
    loaded = AutoModelForCausalLM.from_pretrained(
        source,
        quantization_config=CompressedTensorsConfig(dequantize=True),
        dtype=target,
        local_files_only=True,
    )
    weights = {k: v.detach().to(target) for k, v in loaded.state_dict().items()}
    del loaded
    out.mkdir(parents=True)
    cleaned = {k: v for k, v in config.items() if k != plan.config_key}
    (out / "config.json").write_text(json.dumps(cleaned, indent=2) + "\n", encoding="utf-8")
    settings = AutoConfig.from_pretrained(out)
    plain = AutoModelForCausalLM.from_config(settings, dtype=target)  # type: ignore[no-untyped-call]
    expected = set(plain.state_dict())
    result = plain.load_state_dict(
        {k: v for k, v in weights.items() if k in expected}, strict=False
    )
    tied = set(getattr(plain, "_tied_weights_keys", None) or ())
    missing = [k for k in result.missing_keys if k not in tied]
    if missing:
        raise QuantizeError(
            f"{source}: compressed-tensors gave no float weight for {len(missing)} "
            f"parameters (e.g. {missing[0]}); {PASS_FLOAT}"
        )
    plain.save_pretrained(out)
    for item in source.iterdir():
        skip = item.suffix == ".safetensors" or item.name.endswith(".safetensors.index.json")
        if not skip and not (out / item.name).exists():
            os.symlink(item.resolve(), out / item.name)
    return out
