"""The real-vLLM tier: fixtures shared by the remote and supervised tests.

These tests are marked ``vllm`` and left out of the default suite (pyproject's addopts
``-m "not vllm"``); ``make test-vllm`` (scripts/test-vllm.sh) sets up .venv-vllm and runs
them with ``-m vllm``. Run by hand without the venv they skip, saying how to get it;
with MEDSERVE_VLLM_REQUIRED=1 (what the make target sets) a missing venv fails instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.vllm.vllmproc import VLLM_PYTHON, build_tiny_model

REQUIRED = os.environ.get("MEDSERVE_VLLM_REQUIRED") == "1"

VLLM_MARKS = [
    pytest.mark.vllm,
    # torch and transformers (building the tiny model) warn about their own internals.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """vLLM's interpreter (.venv-vllm, or MEDSERVE_VLLM_PYTHON)."""
    if not VLLM_PYTHON.is_file():
        message = f"no vLLM venv at {VLLM_PYTHON}: run `make test-vllm`"
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    return VLLM_PYTHON


@pytest.fixture(scope="session")
def tiny_model(vllm_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama that vLLM serves (see :func:`build_tiny_model`)."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")
