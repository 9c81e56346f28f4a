"""Real vLLM (CPU build) supervised by `medserve serve` (a ``[replicas.launch]`` table):
a chat through medserve with the official openai client; SIGTERM stops vLLM's whole
process tree and clears its IPC directory; SIGKILL of medserve leaves no vLLM process.

Each test starts its own medserve (and so its own vLLM): both end by stopping it.
Only the processes below that medserve are looked at, so vLLM servers of anything else on
the machine never count.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import openai
import pytest

from medserve.config import Settings
from medserve.engines.vllm import VllmSpec
from tests.conftest import DEV_KEY
from tests.serverproc import Server, running_server
from tests.vllm.conftest import VLLM_MARKS
from tests.vllm.vllmproc import (
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    Proc,
    descendants,
    wait_gone,
)

pytestmark = [
    *VLLM_MARKS,
    pytest.mark.skipif(
        "launch" not in VllmSpec.model_fields,
        reason="VllmSpec has no `launch` table yet: supervised vLLM is not in this tree",
    ),
]
MODEL = "tiny-supervised"


@pytest.fixture
def server(vllm_python: Path, tiny_model: Path, tmp_path: Path) -> Iterator[Server]:
    config = tmp_path / "models.toml"
    config.write_text(
        f'[[models]]\nid = "{MODEL}"\n'
        "[models.defaults]\ntop_k = 0\n"
        '[[models.replicas]]\nengine = "vllm"\n'
        "[models.replicas.launch]\n"
        f'python = "{vllm_python}"\nmodel = "{tiny_model}"\n'
        'args = ["--enforce-eager", "--dtype", "bfloat16", "--max-model-len", "2048"]\n'
        'env = { VLLM_CPU_KVCACHE_SPACE = "1" }\n'
        f"startup_timeout_s = {START_TIMEOUT_S}\n"
    )
    env = {}
    if "state_dir" in Settings.model_fields:  # the supervised instance's directories
        env["MEDSERVE_STATE_DIR"] = str(tmp_path / "state")
    log = tmp_path / "medserve.log"
    # medserve is ready once vLLM is: its start-up bounds the wait.
    with running_server(
        log, "-c", str(config), env=env, startup_timeout_s=START_TIMEOUT_S + 60
    ) as s:
        tree = descendants(s.process.pid)
        try:
            yield s
        finally:
            for proc in tree:  # whatever the test or medserve left behind
                if proc.alive():
                    with suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)


def vllm_tree(server: Server) -> list[Proc]:
    """medserve's descendants, checked to include vLLM's API server and engine."""
    tree = descendants(server.process.pid)
    assert any(p.is_vllm() for p in tree), [(p.pid, p.comm) for p in tree]
    assert any(p.comm.startswith("VLLM::") for p in tree), [(p.pid, p.comm) for p in tree]
    return tree


def ipc_dir(tree: list[Proc]) -> Path:
    dirs = {p.environ().get("VLLM_RPC_BASE_PATH") for p in tree if p.is_vllm()}
    dirs.discard(None)
    assert len(dirs) == 1, dirs
    path = Path(str(dirs.pop()))
    assert any(path.iterdir())  # vLLM's ZMQ sockets, while it runs
    return path


def test_supervised_vllm_answers_and_sigterm_stops_its_whole_tree(server: Server) -> None:
    with openai.OpenAI(
        base_url=f"{server.url}/v1", api_key=DEV_KEY, max_retries=0, timeout=120
    ) as client:
        assert [m.id for m in client.models.list()] == [MODEL]
        r = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Which symptoms point to asthma?"}],
            max_tokens=12,
            temperature=0,
        )
    assert r.model == MODEL and r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 12
    tree = vllm_tree(server)
    ipc = ipc_dir(tree)

    server.process.send_signal(signal.SIGTERM)
    # uvicorn re-raises the captured SIGTERM once its shutdown is complete.
    assert server.process.wait(timeout=STOP_TIMEOUT_S + 60) in (0, -signal.SIGTERM)
    left = wait_gone(tree, STOP_TIMEOUT_S)
    assert left == [], [(p.pid, p.comm) for p in left]
    assert not ipc.exists() or not any(ipc.iterdir())


def test_sigkill_of_medserve_leaves_no_vllm_process(server: Server) -> None:
    tree = vllm_tree(server)
    server.process.kill()
    server.process.wait(timeout=30)
    left = wait_gone(tree, STOP_TIMEOUT_S)
    assert left == [], [(p.pid, p.comm, p.cmdline()[:80]) for p in left]
