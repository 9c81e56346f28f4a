"""`medserve quantize` on the real SmolLM2-135M (slow: a few minutes; run by `.ci/run`).

GGUF F16 must read text exactly as the HF tokenizer does and score within 0.1% of the
original; q4_k_m must serve through `medserve serve` to the openai client and refuse to
load once its bytes change; GPTQ at group size 64 (576 columns: 128 does not divide) must
load back and be evaluated.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from medserve import manifest as mf
from tests.conftest import DEV_KEY
from tests.quant.conftest import QUANT_MARKS, manifest_of, quantize
from tests.serverproc import free_port, running_server

pytestmark = [*QUANT_MARKS, pytest.mark.slow]


def test_gguf_f16_matches_hf_and_q4_k_m_serves(smollm2_hf: Path, tmp_path: Path) -> None:
    out = tmp_path / "smol-gguf"
    done = quantize(
        smollm2_hf, "--to", "gguf", "-t", "f16", "-t", "q8_0", "-t", "q4_k_m",
        "--out", out, "--json",
    )  # fmt: skip
    manifest = manifest_of(done)
    report = manifest["report"]
    arts = {a["type"]: a for a in report["artifacts"]}
    original = report["original"]["perplexity"]
    assert report["original"]["dtype"] == "float32"
    assert manifest["tools"]["converter"]["path"].endswith("convert_hf_to_gguf.py")
    assert arts["f16"]["architecture"] == "llama"
    # Identical token ids (asserted inside the run, recorded here) and F16 within 0.1%.
    assert all(a["tokenizer_match"] for a in arts.values())
    assert abs(arts["f16"]["perplexity"] / original - 1) < 1e-3
    assert abs(arts["q8_0"]["perplexity"] / original - 1) < 1e-2
    # 576 columns are not a multiple of 256: llama.cpp falls back for many K-quant tensors.
    assert set(arts["q4_k_m"]["tensor_types"]) - {"Q4_K", "Q6_K", "F32"}
    assert arts["q4_k_m"]["bytes"] < arts["q8_0"]["bytes"] < arts["f16"]["bytes"]

    models = tmp_path / "models"
    add = [sys.executable, "-m", "medserve", "models", "add", str(out), "--type", "q4_k_m"]
    subprocess.run([*add, "--models-dir", str(models)], check=True, timeout=300)
    (entry,) = models.glob("*.toml")
    assert 'manifest = "' in entry.read_text()
    with running_server(tmp_path / "serve.log", "--models-dir", str(models)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=DEV_KEY, max_retries=0)
        with client:
            (model,) = client.models.list().data
            assert model.id == "smollm2-135m-instruct-q4_k_m"
            reply = client.chat.completions.create(
                model=model.id,
                messages=[{"role": "user", "content": "Name one symptom of anaemia."}],
                max_tokens=24,
                temperature=0,
            )
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0

    # One byte changed after evaluation: the server refuses to load the model.
    gguf = out / arts["q4_k_m"]["file"]
    with gguf.open("r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0xFF]))
    assert mf.check_tree(out) == [f"{gguf.name}: sha256 differs"]
    port = str(free_port())
    refused = subprocess.run(
        [sys.executable, "-m", "medserve", "serve", "--port", port, "--models-dir", str(models)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "does not match its manifest" in refused.stdout + refused.stderr


def test_gptq_group_size_64_loads_back(smollm2_hf: Path, tmp_path: Path) -> None:
    refused = quantize(smollm2_hf, "--to", "gptq", "--out", tmp_path / "g128", check=False)
    assert refused.returncode == 2
    assert "Largest valid group size: --group-size 64" in " ".join(refused.stderr.split())

    out = tmp_path / "smol-gptq"
    done = quantize(
        smollm2_hf, "--to", "gptq", "--group-size", "64", "--samples", "32",
        "--seq-len", "256", "--out", out, "--json",
    )  # fmt: skip
    report = manifest_of(done)["report"]
    (art,) = report["artifacts"]
    assert art["quant_method"] == "compressed-tensors" and art["group_size"] == 64
    original = report["original"]["perplexity"]
    # Loaded back and scored: finite, worse than the original but not broken.
    assert original < art["perplexity"] < 2 * original
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert mf.check_tree(out) == []
