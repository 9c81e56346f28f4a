"""Sources that are, or claim to be, already quantized (issue 12 part 5), and tool failures.

Every row is a tiny LLaMA rewritten to look like what a tool leaves: ``config.json``'s
``quantization_config`` and safetensors tensors with the names and dtypes of that format.
Refusal rows need not be faithful quantizations (they must be refused from the headers
alone, before anything runs); the rows that proceed are real and are converted and
evaluated end to end.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.quant.conftest import QUANT_MARKS, manifest_of, quantize

pytestmark = QUANT_MARKS

LINEAR = re.compile(r"\.(q|k|v|o|gate|up|down)_proj\.weight$")
FP8_MAX = 448.0  # largest finite float8_e4m3fn

Tensors = dict[str, Any]


def variant(
    tiny: Path,
    out: Path,
    quantization_config: dict[str, Any] | None,
    rewrite: Callable[[Tensors], Tensors] | None = None,
) -> Path:
    """A copy of ``tiny`` with this ``quantization_config`` and rewritten tensors."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny, out)
    if rewrite is not None:
        tensors = load_file(str(tiny / "model.safetensors"))
        save_file(rewrite(tensors), str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((tiny / "config.json").read_text())
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def per_linear(make: Callable[[str, Any], Tensors]) -> Callable[[Tensors], Tensors]:
    """Replace every attention/MLP weight ``X.weight`` by the tensors ``make(X, w)`` gives."""

    def rewrite(tensors: Tensors) -> Tensors:
        result: Tensors = {}
        for name, value in tensors.items():
            if LINEAR.search(name):
                result.update(make(name.removesuffix(".weight"), value))
            else:
                result[name] = value
        return result

    return rewrite


def _bnb4(base: str, w: Any) -> Tensors:
    import torch

    return {
        f"{base}.weight": torch.zeros((w.numel() // 2, 1), dtype=torch.uint8),
        f"{base}.weight.absmax": torch.ones(w.numel() // 64),
        f"{base}.weight.quant_map": torch.linspace(-1, 1, 16),
        f"{base}.weight.quant_state.bitsandbytes__nf4": torch.zeros(64, dtype=torch.uint8),
    }


def _bnb8(base: str, w: Any) -> Tensors:
    import torch

    return {
        f"{base}.weight": torch.zeros(w.shape, dtype=torch.int8),
        f"{base}.SCB": torch.ones(w.shape[0]),
        f"{base}.weight_format": torch.zeros((), dtype=torch.uint8),
    }


def _gptq(base: str, w: Any, g_idx: bool = True) -> Tensors:
    import torch

    rows, cols = w.shape
    found = {
        f"{base}.qweight": torch.zeros((cols // 8, rows), dtype=torch.int32),
        f"{base}.qzeros": torch.zeros((cols // 128, rows // 8), dtype=torch.int32),
        f"{base}.scales": torch.ones((cols // 128, rows), dtype=torch.float16),
    }
    if g_idx:
        found[f"{base}.g_idx"] = torch.zeros(cols, dtype=torch.int32)
    return found


def _packed(base: str, w: Any) -> Tensors:
    import torch

    rows, cols = w.shape
    return {
        f"{base}.weight_packed": torch.zeros((rows, cols // 8), dtype=torch.int32),
        f"{base}.weight_scale": torch.ones((rows, cols // 128), dtype=torch.float16),
        f"{base}.weight_shape": torch.tensor([rows, cols], dtype=torch.int32),
    }


def _hqq(base: str, w: Any) -> Tensors:
    import torch

    return {f"{base}.W_q": torch.zeros((w.numel() // 2,), dtype=torch.uint8)}


def _eetq(base: str, w: Any) -> Tensors:
    import torch

    return {
        f"{base}.weight": torch.zeros(w.shape[::-1], dtype=torch.int8),
        f"{base}.weight_scales": torch.ones(w.shape[0], dtype=torch.float16),
    }


def fp8_block(base: str, w: Any, block: int = 128) -> Tensors:
    """Real fine-grained FP8 (DeepSeek-V3/Qwen3 style): one scale per 128x128 block."""
    rows, cols = w.shape
    blocks = w.float().reshape(rows // block, block, cols // block, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    expanded = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)
    return {f"{base}.weight": fp8_cast(w / expanded), f"{base}.weight_scale_inv": scale}


def fp8_channel(base: str, w: Any) -> Tensors:
    """Real compressed-tensors float-quantized FP8: one scale per output channel."""
    scale = w.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return {f"{base}.weight": fp8_cast(w / scale), f"{base}.weight_scale": scale}


def fp8_cast(values: Any) -> Any:
    import torch

    return values.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def _fp8_bad_scale(base: str, w: Any) -> Tensors:
    import torch

    found = fp8_block(base, w)
    found[f"{base}.weight_scale_inv"] = torch.ones(3, 5)
    return found


BNB4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
BNB8 = {"quant_method": "bitsandbytes", "load_in_8bit": True}
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}
AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"}
CT_FP8 = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
        }
    },
}
CT_FP8_BLOCK = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "block",
                        "block_structure": [128, 128]},
        }
    },
}  # fmt: skip


def _ct_fp8_block(base: str, w: Any) -> Tensors:
    found = fp8_block(base, w)
    found[f"{base}.weight_scale"] = found.pop(f"{base}.weight_scale_inv")
    return found


FP8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
GGUF = {"quant_method": "gguf", "compute_dtype": "float32"}

REFUSED: list[Any] = [
    pytest.param(BNB4, _bnb4, ["bitsandbytes 4-bit", "QLoRA", "--lora"], id="bnb-4bit"),
    pytest.param(BNB8, _bnb8, ["bitsandbytes 8-bit", "--lora"], id="bnb-8bit"),
    pytest.param(GPTQ, _gptq, ["GPTQ tensors", "quant_method 'gptq'"], id="gptq"),
    pytest.param(AWQ, lambda b, w: _gptq(b, w, g_idx=False), ["AWQ tensors", "'awq'"], id="awq"),
    # Packed integers whose config does not say how to read them.
    pytest.param(None, _packed, ["compressed-tensors integer", "under no"], id="ct-unclaimed"),
    pytest.param({"quant_method": "hqq"}, _hqq, ["HQQ tensors", "'hqq'"], id="hqq"),
    pytest.param({"quant_method": "eetq"}, _eetq, ["non-float", "(I8)", "'eetq'"], id="eetq"),
    # Quantized weights under no claim at all: the tensors decide, not the config.
    pytest.param(None, _bnb4, ["bitsandbytes 4-bit"], id="bnb-4bit-unclaimed"),
    pytest.param(FP8, _fp8_bad_scale, ["FP8 tensor", "fits no"], id="fp8-unknown-scale"),
]


@pytest.mark.parametrize(("claim", "make", "expected"), REFUSED)
def test_quantized_source_is_refused_before_any_work(
    tiny_llama: Path,
    tmp_path: Path,
    claim: dict[str, Any] | None,
    make: Callable[[str, Any], Tensors],
    expected: list[str],
) -> None:
    source = variant(tiny_llama, tmp_path / "src", claim, per_linear(make))
    before = sorted(p.name for p in tmp_path.iterdir())
    for to in ("gguf", "gptq"):
        done = quantize(source, "--to", to, "--out", tmp_path / "out", check=False)
        assert done.returncode == 2, done.stderr
        message = " ".join(done.stderr.split())
        assert "already-quantized weights" in message
        for part in [*expected, "pass the"]:
            assert part in message, message
        assert "Traceback" not in done.stderr
        # Refused before anything ran: no stage started, nothing written beside --out.
        assert "hash inputs" not in done.stderr and "evaluate" not in done.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == before


def _plan(source: Path) -> Any:
    from medserve.quantize import prequant
    from medserve.quantize.source import check_checkpoint

    return prequant.inspect(source, check_checkpoint(source))


@pytest.mark.parametrize(
    ("claim", "make", "action", "found"),
    [
        (None, None, "none", "float32"),
        (GGUF, None, "clean", "float32"),
        (BNB4, None, "clean", "float32"),  # merged and saved, the claim left behind
        (GPTQ, None, "clean", "float32"),
        (FP8, fp8_block, "dequantize-fp8", "FP8 (14 float8 tensors with scales)"),
        (CT_FP8, fp8_channel, "dequantize-fp8", "FP8 (14 float8 tensors with scales)"),
        (CT_FP8_BLOCK, _ct_fp8_block, "dequantize-fp8", "FP8 (14 float8 tensors with scales)"),
    ],
    ids=[
        "float",
        "stale-gguf",
        "false-bnb",
        "false-gptq",
        "fp8-block",
        "ct-fp8-channel",
        "ct-fp8-block",
    ],  # fmt: skip
)
def test_what_the_source_is_decides_the_plan(
    tiny_llama: Path,
    tmp_path: Path,
    claim: dict[str, Any] | None,
    make: Callable[[str, Any], Tensors] | None,
    action: str,
    found: str,
) -> None:
    rewrite = per_linear(make) if make is not None else None
    plan = _plan(variant(tiny_llama, tmp_path / "src", claim, rewrite))
    assert (plan.action, plan.found) == (action, found)
    assert plan.claimed == (claim["quant_method"] if claim else None)


def test_fp8_dequantization_is_weight_times_scale(tiny_llama: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from medserve.quantize import prequant

    source = variant(tiny_llama, tmp_path / "src", FP8, per_linear(fp8_block))
    config = json.loads((source / "config.json").read_text())
    out = prequant.dequantize_fp8(source, config, _plan(source), tmp_path / "deq")
    stored = load_file(str(source / "model.safetensors"))
    ours = load_file(str(out / "model.safetensors"))
    original = load_file(str(tiny_llama / "model.safetensors"))
    assert set(ours) == set(original)  # scales gone, every weight back under its name
    name = "model.layers.0.self_attn.k_proj.weight"  # [128, 256]: two blocks
    scale = stored[f"{name}_scale_inv"]
    expected = stored[name].float() * scale.repeat_interleave(128, 0).repeat_interleave(128, 1)
    assert ours[name].dtype == torch.float32
    assert torch.equal(ours[name], expected)
    # FP8 keeps about 2 significant digits: close to the float original, not equal to it.
    error = (ours[name] - original[name]).abs().max() / original[name].abs().max()
    assert 0 < error.item() < 0.07
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


@pytest.mark.parametrize(
    ("claim", "make", "action", "lora"),
    [
        (GGUF, None, "clean", False),
        (GGUF, None, "clean", True),  # the QLoRA-free way: float base plus --lora
        (FP8, fp8_block, "dequantize-fp8", False),
        (CT_FP8, fp8_channel, "dequantize-fp8", False),
    ],
    ids=["stale-gguf", "stale-gguf-with-lora", "fp8-block", "ct-fp8-channel"],
)
def test_source_that_can_be_used_converts_and_evaluates(
    tiny_llama: Path,
    tiny_lora: Path,
    tmp_path: Path,
    claim: dict[str, Any],
    make: Callable[[str, Any], Tensors] | None,
    action: str,
    lora: bool,
) -> None:
    rewrite = per_linear(make) if make is not None else None
    source = variant(tiny_llama, tmp_path / "src", claim, rewrite)
    config_before = (source / "config.json").read_bytes()
    out = tmp_path / "out"
    adapter = ("--lora", tiny_lora) if lora else ()
    done = quantize(
        source, "--to", "gguf", "-t", "f16", "--eval-tokens", "512", "--out", out, "--json",
        *adapter,
    )  # fmt: skip
    manifest = manifest_of(done)
    recorded = manifest["source"]["quantization"]
    assert (recorded["claimed"], recorded["action"]) == (claim["quant_method"], action)
    assert (manifest["adapter"] is not None) == lora
    art = manifest["report"]["artifacts"][0]
    original = manifest["report"]["original"]["perplexity"]
    assert art["tokenizer_match"] is True
    assert abs(art["perplexity"] / original - 1) < 1e-3
    # The user's checkpoint is untouched, and no log of a failure was left.
    assert (source / "config.json").read_bytes() == config_before
    assert not list(tmp_path.glob("*.log"))


def _unknown_architecture(source: Path, config: dict[str, Any]) -> None:
    # transformers loads by model_type (llama); llama.cpp's converter by architectures.
    config["architectures"] = ["NoSuchModelForCausalLM"]


def _unmappable_tensor(source: Path, config: dict[str, Any]) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    # transformers ignores an unexpected tensor; the converter stops with a traceback.
    tensors = load_file(str(source / "model.safetensors"))
    tensors["model.layers.0.surplus.weight"] = torch.zeros(4, 4)
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("break_it", "summary", "in_log"),
    [
        (_unknown_architecture, "Model NoSuchModelForCausalLM is not supported", "ERROR"),
        (_unmappable_tensor, "model.layers.0.surplus.weight", "Traceback"),
    ],
    ids=["unknown-architecture", "traceback"],
)
def test_converter_failure_is_one_line_and_a_log_file(
    tiny_llama: Path,
    tmp_path: Path,
    break_it: Callable[[Path, dict[str, Any]], None],
    summary: str,
    in_log: str,
) -> None:
    source = tmp_path / "src"
    shutil.copytree(tiny_llama, source)
    config = json.loads((source / "config.json").read_text())
    break_it(source, config)
    (source / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    args = (source, "--to", "gguf", "-t", "f16", "--eval-tokens", "256", "--out", out)
    done = quantize(*args, check=False)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and 'File "' not in done.stderr
    log = tmp_path / "out.convert.log"
    message = " ".join(done.stderr.split())
    assert "llama.cpp's converter failed (exit 1)" in message
    assert summary in message
    assert str(log) in done.stderr.replace("\n", "")  # rich may fold the long path
    assert in_log in log.read_text()
    assert not out.exists()
    # A later successful run removes the log of the failure.
    shutil.rmtree(source)
    shutil.copytree(tiny_llama, source)
    quantize(*args)
    assert not log.exists()


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["INFO:x", "Traceback (most recent call last):", '  File "c.py"',
          "NotImplementedError: Quant method is not yet supported: 'gguf'"],
         "NotImplementedError: Quant method is not yet supported: 'gguf'"),
        (["llama_model_quantize: failed to quantize: bad magic", ""],
         "llama_model_quantize: failed to quantize: bad magic"),
        (["just output", "last words"], "last words"),
        ([], "no output"),
    ],
)  # fmt: skip
def test_last_error_line(lines: list[str], expected: str) -> None:
    from medserve.quantize.gguf import last_error

    assert last_error(lines) == expected


@pytest.fixture(scope="module")
def tiny_gptq(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """medserve's own --to gptq output (compressed-tensors pack-quantized, int4 g128)."""
    out = tmp_path_factory.mktemp("gptq") / "tiny-gptq"
    quantize(tiny_llama, "--to", "gptq", "--samples", "8", "--seq-len", "64", "--out", out)
    return out


def test_compressed_tensors_source_is_dequantized_and_converted(
    tiny_llama: Path, tiny_gptq: Path, tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import load_file

    from medserve.quantize import prequant

    plan = _plan(tiny_gptq)
    assert (plan.action, plan.claimed) == ("dequantize-compressed", "compressed-tensors")
    config = json.loads((tiny_gptq / "config.json").read_text())
    deq = prequant.dequantize_compressed(tiny_gptq, config, plan, tmp_path / "deq")
    assert "quantization_config" not in json.loads((deq / "config.json").read_text())
    ours = load_file(str(deq / "model.safetensors"))
    packed = load_file(str(tiny_gptq / "model.safetensors"))
    original = load_file(str(tiny_llama / "model.safetensors"))
    assert set(ours) == set(original)
    # Independently of compressed-tensors: 8 signed 4-bit values per int32 along the
    # input dimension, offset 8, times one scale per 128 columns.
    name = "model.layers.1.mlp.down_proj.weight"  # [256, 768]
    words = packed[f"{name}_packed"]
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    q = ((words.unsqueeze(-1) >> shifts) & 0xF).reshape(words.shape[0], -1) - 8
    scale = packed[f"{name}_scale"].float().repeat_interleave(128, 1)
    assert torch.allclose(ours[name].float(), q.float() * scale, rtol=0, atol=1e-6)
    error = (ours[name] - original[name]).norm() / original[name].norm()
    assert 0 < error.item() < 0.2  # 4-bit GPTQ: near the original, not equal to it

    out = tmp_path / "out"
    done = quantize(
        tiny_gptq, "--to", "gguf", "-t", "f16", "--eval-tokens", "512", "--out", out, "--json"
    )
    manifest = manifest_of(done)
    assert manifest["source"]["quantization"]["action"] == "dequantize-compressed"
    art = manifest["report"]["artifacts"][0]
    assert art["tokenizer_match"] is True
    assert abs(art["perplexity"] / manifest["report"]["original"]["perplexity"] - 1) < 1e-3


def test_quantizer_failure_is_one_line_and_a_log_file(tmp_path: Path) -> None:
    from medserve.quantize import QuantizeError, gguf
    from medserve.quantize.progress import Quiet

    broken = tmp_path / "base-f16.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 60)  # a header and nothing behind it
    log = tmp_path / "out.quantize-q4_0.log"
    with Quiet().stage("quantize") as stage, pytest.raises(QuantizeError) as caught:
        gguf.quantize(broken, tmp_path / "q.gguf", "q4_0", 1, stage, log)
    message = str(caught.value)
    assert message.startswith("llama.cpp's quantizer failed for q4_0")
    assert len(message.splitlines()) == 2 and str(log) in message
    assert message.splitlines()[0].split(": ", 1)[1] in log.read_text()
    assert not (tmp_path / "q.gguf").exists()


def test_gptq_failure_is_one_line_and_a_log_file(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    from transformers import AutoModelForCausalLM

    from medserve.quantize import QuantizeError, gptq
    from medserve.quantize.progress import Quiet

    def broken(**kwargs: Any) -> None:  # llm-compressor failing deep inside
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (64x256 and 3x3)\nmore")

    # The module (its package re-exports a function of the same name).
    entry = importlib.import_module("llmcompressor.entrypoints.oneshot")
    monkeypatch.setattr(entry, "oneshot", broken)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    log = tmp_path / "out.gptq.log"
    with Quiet().stage("gptq") as stage, pytest.raises(QuantizeError) as caught:
        gptq.quantize(model, [[1] * 32], 4, 128, 64, stage, log)
    message = str(caught.value)
    assert message.splitlines() == [
        "GPTQ (llm-compressor) failed: RuntimeError: mat1 and mat2 shapes cannot be "
        "multiplied (64x256 and 3x3)",
        f"The traceback is in {log}",
    ]
    assert "Traceback" in log.read_text() and "def broken" not in message
