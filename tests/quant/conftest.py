"""Fixtures for `medserve quantize`: real small models in HF format, built in the session.

- ``tiny_llama``: a 2-layer LLaMA (hidden 256, MLP 768: multiples of 256, so K-quants and
  GPTQ groups fit) with a SentencePiece BPE tokenizer (byte fallback, Llama-2/Mistral
  style) trained here on the project's calibration texts; random weights. Seconds to build.
  :func:`build_tiny` makes a Mistral sibling the same way.
- ``tiny_lora``: a PEFT LoRA adapter for it with random (non-zero) A and B, so merging it
  changes the outputs.
- ``smollm2_hf``: the real SmolLM2-135M-Instruct, from the packaged Q4_1 GGUF dequantized
  by transformers and saved as a plain safetensors checkpoint (about 540 MB, 20-40 s).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, smollm2_path

# Outside CI a venv without the quant extra skips these (saying so); CI must run them.
MISSING = importlib.util.find_spec("llmcompressor") is None and not os.environ.get("CI")
QUANT_MARKS = [
    pytest.mark.quant,
    pytest.mark.skipif(MISSING, reason="the quant extra is not installed (setup-venv.sh quant)"),
    # torch, transformers, peft and llm-compressor warn about their own internals.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


def calibration_texts() -> list[str]:
    lines = (ROOT / "quant" / "calibration.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines if line.strip()]


def train_spm_tokenizer(out: Path) -> None:
    """A SentencePiece BPE (byte fallback) trained on the calibration texts, HF-saved."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    out.mkdir(parents=True)
    model_file = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(calibration_texts()),
        model_writer=model_file,
        vocab_size=512,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model_file.getvalue())
    # From the directory: transformers converts tokenizer.model to its fast form there.
    LlamaTokenizer.from_pretrained(out).save_pretrained(out)


def smollm2_tokenizer(out: Path) -> None:
    """SmolLM2's real byte-level BPE tokenizer (from the packaged GGUF), HF-saved."""
    from transformers import AutoTokenizer

    gguf = smollm2_path()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    # transformers' GGUF tokenizer import gives a byte-level BPE a SentencePiece-style
    # decoder chain (ByteFallback, Replace), which SmolLM2's own tokenizer.json does not
    # have and which makes llama.cpp's converter take it for a Llama-2 vocabulary. Restore
    # the published form: a plain ByteLevel decoder.
    path = out / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["decoder"] = {
        "type": "ByteLevel",
        "add_prefix_space": True,
        "trim_offsets": True,
        "use_regex": True,
    }
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def build_tiny(arch: str, out: Path) -> Path:
    """A random 2-layer model of family ``arch`` (llama, mistral) with the SentencePiece
    tokenizer; widths are multiples of 256, so K-quants and GPTQ groups fit."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    train_spm_tokenizer(out)
    vocab = len(AutoTokenizer.from_pretrained(out))
    config = AutoConfig.for_model(
        arch,
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


def build_lora(base: Path, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True)
    torch.manual_seed(1)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,  # random B: the adapter really changes the model
        task_type="CAUSAL_LM",
    )
    get_peft_model(model, config).save_pretrained(str(out))
    return out


def build_smollm2(out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    gguf = smollm2_path()
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # A GGUF-loaded model refuses save_pretrained; a plain copy of its weights does not.
    # Its config still says "quantized with gguf": the copy is a plain float checkpoint.
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig.from_dict(settings))
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    smollm2_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny("llama", tmp_path_factory.mktemp("models") / "tiny-med-llama")


@pytest.fixture(scope="session")
def tiny_lora(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_lora(tiny_llama, tmp_path_factory.mktemp("adapters") / "tiny-lora")


@pytest.fixture(scope="session")
def smollm2_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_smollm2(tmp_path_factory.mktemp("models") / "smollm2-135m-instruct")


def quantize(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `medserve quantize ARGS` as a user would (its own process)."""
    cmd = [sys.executable, "-m", "medserve", "quantize", *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"exit {done.returncode}\n{done.stderr[-4000:]}")
    return done


def manifest_of(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The --json output: stdout must be exactly one JSON document."""
    data: dict[str, Any] = json.loads(done.stdout)
    return data
