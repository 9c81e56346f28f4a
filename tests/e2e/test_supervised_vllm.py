"""End to end: `medserve serve` starts a supervised vLLM replica (the fake child,
tests/fakevllm.py), answers through it, and leaves no process behind when it is SIGKILLed
(the shim's parent-death signal) or stopped with SIGTERM; the child never sees medserve's
secrets."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import AUTH
from tests.fakevllm import FAKE, instance_processes, starts
from tests.serverproc import running_server

pytestmark = pytest.mark.e2e
MODEL = "med-gpu"
GONE_WITHIN_S = 60.0


def config(tmp_path: Path) -> tuple[Path, Path]:
    """A config file with one supervised replica on the fake; (config, model dir)."""
    model = tmp_path / "weights"
    model.mkdir()
    path = tmp_path / "medserve.toml"
    command = json.dumps([sys.executable, str(FAKE)])
    path.write_text(
        f'state_dir = "state"\n[[models]]\nid = "{MODEL}"\n[[models.replicas]]\n'
        f'engine = "vllm"\n[models.replicas.launch]\ncommand = {command}\n'
        f'model = "{model}"\nargs = ["--max-model-len", "128"]\n'
        "startup_timeout_s = 60\nshutdown_timeout_s = 5\n"
    )
    return path, model


def wait_gone(model: Path) -> dict[int, str]:
    """Poll (bounded) until no process of the instance is left; what is left."""
    deadline = time.monotonic() + GONE_WITHIN_S
    while (left := instance_processes(model)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_medserve_dying_leaves_no_vllm_process(tmp_path: Path, sig: signal.Signals) -> None:
    path, model = config(tmp_path)
    env = {"HF_TOKEN": "hf_medserve_test_secret"}
    with running_server(tmp_path / "medserve.log", "-c", str(path), env=env) as server:
        answer = httpx.post(
            f"{server.url}/v1/chat/completions",
            headers=AUTH,
            json={"model": MODEL, "messages": [{"role": "user", "content": "a b"}]},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == "user: a b assistant:"
        (run,) = starts(model)
        alive = instance_processes(model)
        assert {run["pid"], run["engine"]} <= set(alive)
        assert "medserve-shim" in alive.values()
        assert alive[run["engine"]].startswith("VLLM::")
        instance = tmp_path / "state" / "vllm" / f"{MODEL}.0"
        assert (instance / "vllm.log").is_file()
        ipc = Path(run["env"]["VLLM_RPC_BASE_PATH"])
        assert ipc.is_dir()

        os.kill(server.process.pid, sig)
        server.process.wait(timeout=60)
        assert wait_gone(model) == {}
        assert not ipc.exists()  # the shim removes it when medserve could not

    env_seen = run["env"]
    assert not [k for k in env_seen if k.startswith("MEDSERVE_") or k == "HF_TOKEN"]
    assert env_seen["HF_HUB_OFFLINE"] == "1" and env_seen["VLLM_NO_USAGE_STATS"] == "1"
