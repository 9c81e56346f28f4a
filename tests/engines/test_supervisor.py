"""Supervised vLLM replicas against a fake vLLM child (tests/fakevllm.py) on loopback: start
→ ready → chat; a crash → restart with backoff → ready again; crash loop; exit 2 before
ready; stop leaves no process of the instance (the fake ``VLLM::EngineCore`` included);
the child's environment is the allow-list's; the IPC directory is removed.

Processes are found here independently of the supervisor: by the model directory (unique
per test) on their command line."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from medserve.api.app import create_app
from medserve.config import ModelSpec, Settings
from medserve.doctor import checks
from medserve.engines.base import GenerationRequest, Health, Message, Sampling
from medserve.engines.fake import FakeEngine
from medserve.engines.supervisor import LaunchSpec, Supervisor, tail
from medserve.engines.vllm import VllmEngine, VllmSpec, upstream_hosts
from medserve.errors import EngineError, UnavailableError
from medserve.privacy import OFFLINE_ENV
from medserve.router import Router, Served
from tests.conftest import AUTH, fake_spec, flat_spec
from tests.fakevllm import FAKE, instance_processes, starts

pytestmark = pytest.mark.anyio
WAIT_S = 60.0


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


async def until(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Poll ``condition`` until it holds (bounded)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def request() -> GenerationRequest:
    s = Sampling(
        max_tokens=8,
        temperature=0.5,
        top_p=0.9,
        top_k=7,
        min_p=0.0,
        repeat_penalty=1.0,
        frequency_penalty=0.0,
        presence_penalty=0.0,
        seed=3,
    )
    return GenerationRequest("r1", "med", s, messages=(Message("user", "a b c"),))


class Setup:
    """A model directory with a plan for the fake, and the engine built on it."""

    def __init__(self, tmp_path: Path) -> None:
        self.model = tmp_path / "model"
        self.model.mkdir()
        self.state = tmp_path / "state"
        self.engines: list[VllmEngine] = []

    def plan(self, *runs: dict[str, Any]) -> None:
        (self.model / "plan.json").write_text(json.dumps(list(runs)))

    def engine(self, **launch: Any) -> VllmEngine:
        fields: dict[str, Any] = {
            "command": (sys.executable, str(FAKE)),
            "model": self.model,
            "state_dir": self.state,
            "startup_timeout_s": WAIT_S,
            "shutdown_timeout_s": 5.0,
            "restart_backoff_s": 0.05,
            "restart_backoff_max_s": 0.2,
        }
        replica = VllmSpec(engine="vllm", launch=LaunchSpec(**(fields | launch)))
        self.spec = ModelSpec(id="med", replicas=(replica,))
        e = VllmEngine(self.spec, replica)
        self.engines.append(e)
        return e

    def supervisor(self, e: VllmEngine) -> Supervisor:
        assert e.supervisor is not None
        return e.supervisor


@pytest.fixture
async def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Setup]:
    monkeypatch.setenv("HF_TOKEN", "hf_medserve_test_secret")  # must not reach the child
    s = Setup(tmp_path)
    yield s
    for e in s.engines:
        await e.close()
    assert instance_processes(s.model) == {}


async def chat(e: VllmEngine) -> str:
    return "".join([c.text async for c in e.generate(request())])


async def test_start_ready_chat_stop_leaves_nothing(setup: Setup) -> None:
    e = setup.engine(env={"OMP_NUM_THREADS": "1"}, args=("--dtype", "bfloat16"))
    await e.start()
    health = await e.health()
    assert health.ready and health.detail is None
    assert e.info.context_length == 256  # read from the child's /v1/models
    assert await chat(e) == "user: a b c assistant:"

    (run,) = starts(setup.model)
    alive = instance_processes(setup.model)
    assert {run["pid"], run["engine"]} <= set(alive)
    assert alive[run["engine"]].startswith("VLLM::")
    argv = run["argv"][1:]
    for pair in (["--served-model-name", "med"], ["--host", "127.0.0.1"], ["--dtype", "bfloat16"]):
        assert argv[argv.index(pair[0]) + 1] == pair[1]
    assert "--no-enable-log-requests" in argv

    env = run["env"]
    dirs = setup.supervisor(e).dirs
    assert dirs is not None and dirs.ipc.is_dir()
    assert {k: env[k] for k in OFFLINE_ENV} == OFFLINE_ENV
    assert env["VLLM_RPC_BASE_PATH"] == str(dirs.ipc) and env["TMPDIR"] == str(dirs.tmp)
    for name in ("HOME", "VLLM_CACHE_ROOT", "VLLM_CONFIG_ROOT", "TORCHINDUCTOR_CACHE_DIR"):
        assert env[name].startswith(str(dirs.root)), name
    assert env["OMP_NUM_THREADS"] == "1" and len(env["VLLM_API_KEY"]) >= 32
    assert os.environ["MEDSERVE_AUTH__DEV_KEY"]  # the test process has secrets ...
    assert not [k for k in env if k.startswith("MEDSERVE_") or k == "HF_TOKEN"]  # ... not it
    assert set(env) <= {"PATH", "LANG", "PYTHONUNBUFFERED", "OMP_NUM_THREADS", *OFFLINE_ENV} | {
        "HOME",
        "TMPDIR",
        "VLLM_RPC_BASE_PATH",
        "VLLM_CACHE_ROOT",
        "VLLM_CONFIG_ROOT",
        "TORCHINDUCTOR_CACHE_DIR",
        "TRITON_CACHE_DIR",
        "XDG_CACHE_HOME",
        "XDG_CONFIG_HOME",
        "VLLM_API_KEY",
    }

    await e.close()
    assert instance_processes(setup.model) == {}  # at once: close waits for the whole tree
    assert not dirs.run.exists() and not dirs.ipc.exists()
    assert (await e.health()).ready is False


async def test_a_crash_restarts_with_backoff_and_serves_again(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="medserve.engines.supervisor")
    e = setup.engine()
    await e.start()
    (first,) = starts(setup.model)
    os.kill(first["pid"], signal.SIGKILL)  # the API server dies; its engine is orphaned
    await until(lambda: len(starts(setup.model)) == 2, "a second start")
    sup = setup.supervisor(e)
    await until(lambda: sup.state == "ready", "ready again")
    assert await chat(e) == "user: a b c assistant:"  # through the new port and key
    second = starts(setup.model)[1]
    alive = instance_processes(setup.model)
    assert first["pid"] not in alive and first["engine"] not in alive
    assert second["pid"] in alive and second["env"]["VLLM_API_KEY"] != first["env"]["VLLM_API_KEY"]
    events = [r.getMessage() for r in caplog.records if r.name == "medserve.engines.supervisor"]
    backoff = [m for m in events if m.startswith("vllm replica backoff")]
    assert backoff and "exited with code 137 (SIGKILL)" in backoff[0], events


async def test_a_crash_loop_stops_restarting_and_says_so(setup: Setup) -> None:
    setup.plan({}, {"exit": 1})  # serves once, then every start fails
    e = setup.engine(crash_loop_failures=3)
    await e.start()
    os.kill(starts(setup.model)[0]["pid"], signal.SIGKILL)
    sup = setup.supervisor(e)
    await until(lambda: sup.state == "crash_loop", "the crash loop")
    assert len(starts(setup.model)) == 3  # the run that served, then two that exited 1
    health = await e.health()
    assert not health.ready and health.detail is not None
    assert "crash loop: 3 failed runs" in health.detail and "exited with code 1" in health.detail
    # The last run never got ready: its own lines may be shown, the serving run's not.
    shown = sup.log_tail()
    assert "start 3" in shown and "start 2" not in shown and "start 1" not in shown
    with pytest.raises(UnavailableError):
        await chat(e)
    status = json.loads((setup.state / "vllm" / "med.0" / "status.json").read_text())
    assert status["state"] == "crash_loop"


@pytest.mark.parametrize(
    ("launch", "plan", "expected", "in_log"),
    [
        pytest.param(
            {"args": ("--bogus",)},
            {},
            r"exited with code 2 \(a bad vLLM argument or setting\); not restarted",
            "unrecognized arguments: --bogus",
            id="argparse",
        ),
        pytest.param(
            {"command": ("/nonexistent/vllm-python",)},
            {},
            r"exited with code 127 \(the command does not exist\); not restarted",
            "cannot run /nonexistent/vllm-python",
            id="no-command",
        ),
        pytest.param(
            {"crash_loop_failures": 2},
            {"exit": 1},
            r"crash loop: 2 failed runs within 600 s, the last exited with code 1",
            "fake vllm: exiting with 1",
            id="crash-loop-at-start",
        ),
    ],
)
async def test_a_start_that_cannot_succeed_fails_with_the_log(
    setup: Setup, launch: dict[str, Any], plan: dict[str, Any], expected: str, in_log: str
) -> None:
    setup.plan(plan)
    e = setup.engine(**launch)
    with pytest.raises(EngineError, match=expected) as caught:
        await e.start()
    assert in_log in str(caught.value)  # the tail of vLLM's log, for the operator
    runs = setup.state / "vllm" / "med.0" / "vllm.log"
    assert in_log in runs.read_text()
    if "command" not in launch:  # no restart beyond the policy
        assert len(starts(setup.model)) == launch.get("crash_loop_failures", 1)
    state = "failed" if "crash_loop_failures" not in launch else "crash_loop"
    assert setup.supervisor(e).state == state  # kept, with its reason, after the stop


async def test_a_start_past_its_timeout_is_stopped(setup: Setup) -> None:
    setup.plan({"startup_s": 120})
    e = setup.engine(startup_timeout_s=1.0, crash_loop_failures=1)
    with pytest.raises(EngineError, match="not ready within 1 s"):
        await e.start()
    assert instance_processes(setup.model) == {}
    sup = setup.supervisor(e)
    assert sup.state in ("stopped", "crash_loop") and "not ready within 1 s" in sup.reason


async def test_stop_kills_a_tree_that_ignores_sigterm(setup: Setup) -> None:
    setup.plan({"ignore_term": True, "engine_ignores_term": True})
    e = setup.engine(shutdown_timeout_s=0.5)
    await e.start()
    (run,) = starts(setup.model)
    assert set(instance_processes(setup.model)) >= {run["pid"], run["engine"]}
    await e.close()
    assert instance_processes(setup.model) == {}
    log = (setup.state / "vllm" / "med.0" / "vllm.log").read_text()
    assert "still running after 0.5 s: SIGKILL" in log


async def test_two_replicas_get_their_own_instance_directories(setup: Setup) -> None:
    a, b = setup.engine(), setup.engine()
    await asyncio.gather(a.start(), b.start())
    dirs = [setup.supervisor(x).dirs for x in (a, b)]
    assert {d.root.name for d in dirs if d} == {"med.0", "med.1"}
    assert await chat(a) == await chat(b)


async def test_doctor_shows_why_a_replica_is_down_with_its_log(setup: Setup) -> None:
    e = setup.engine(args=("--bogus",))
    with pytest.raises(EngineError):
        await e.start()
    found = {c.name: c for c in checks(Settings(), [setup.spec], hash_models=False)}
    assert found["model med"].level == "ok" and "supervised vLLM" in found["model med"].detail
    last = found["model med last run"]
    assert last.level == "warn" and "med.0: failed (exited with code 2" in last.detail
    assert "unrecognized arguments: --bogus" in last.detail  # the run never got ready

    gone = ModelSpec(
        id="gone",
        replicas=({"engine": "vllm", "launch": launch(python=str(setup.model / "nope"))},),
    )
    found = {c.name: c for c in checks(Settings(), [gone], hash_models=False)}
    assert (
        found["model gone"].level == "danger" and "not an executable" in found["model gone"].detail
    )


def test_ready_says_why_a_replica_is_down() -> None:
    class Down(FakeEngine):
        """An in-process engine reporting a supervised replica's reason (read live)."""

        def health_now(self) -> Health:
            return Health(ready=False, detail="crash loop: 5 failed runs within 600 s")

        async def health(self) -> Health:
            return self.health_now()

    app = create_app(Settings(), Router([Served(fake_spec(), (Down(fake_spec()),))]))
    with TestClient(app, headers=AUTH) as client:
        ready = client.get("/ready")
    assert ready.status_code == 503
    assert ready.json()["models"][0]["detail"] == "crash loop: 5 failed runs within 600 s"


def launch(**fields: Any) -> dict[str, Any]:
    return {"python": "/opt/vllm/bin/python", "model": "/models/m"} | fields


@pytest.mark.parametrize(
    ("replica", "expected"),
    [
        ({"url": "http://h:1", "launch": launch()}, "exactly one of `url`"),
        ({}, "exactly one of `url`"),
        ({"launch": launch(), "api_key": "k"}, "api_key is for remote replicas"),
        ({"launch": launch(command=["podman"])}, "exactly one of `python`"),
        ({"launch": {"model": "/m"}}, "exactly one of `python`"),
        ({"launch": launch(args=["--port", "1"])}, "--port cannot be given"),
        ({"launch": launch(args=["--host=0.0.0.0"])}, "--host cannot be given"),
        ({"launch": launch(args=["--enable_log_requests"])}, "writes prompts"),
        ({"launch": launch(args=["--disable-log-requests"])}, "retired"),
        ({"launch": launch(env={"HF_TOKEN": "x"})}, "HF_TOKEN looks like a secret"),
        ({"launch": launch(env={"VLLM_API_KEY": "x"})}, "set by medserve"),
        ({"launch": launch(env={"HF_HUB_OFFLINE": "0"})}, "set by medserve"),
        ({"launch": launch(env={"MEDSERVE_AUTH__DEV_KEY": "x"})}, "looks like a secret"),
        (
            {"launch": launch(env={"VLLM_PRIVATE_KEY_PEM": "x"})},
            "VLLM_PRIVATE_KEY_PEM looks like a secret",
        ),
        (
            {"launch": launch(env={"VLLM_S3_ACCESS_KEY_ID": "x"})},
            "VLLM_S3_ACCESS_KEY_ID looks like a secret",
        ),
        (
            {"launch": launch(env={"VLLM_HF_TOKEN_PATH": "x"})},
            "VLLM_HF_TOKEN_PATH looks like a secret",
        ),
        ({"launch": launch(env={"AWS_REGION": "x"})}, "not an allowed name"),
    ],
)
def test_invalid_replica_specs_are_refused(replica: dict[str, Any], expected: str) -> None:
    with pytest.raises(ValidationError, match=expected):
        VllmSpec.model_validate({"engine": "vllm", **replica})


def test_supervised_replicas_need_no_egress() -> None:
    spec = flat_spec(
        id="m",
        replicas=[
            {"engine": "vllm", "launch": launch(env={"CUDA_VISIBLE_DEVICES": "0"})},
            {"engine": "vllm", "url": "http://gpu-2:8000"},
        ],
    )
    assert upstream_hosts([spec]) == ["gpu-2"]


@pytest.mark.parametrize(
    "name",
    [
        "CUDA_VISIBLE_DEVICES",
        "VLLM_CPU_KVCACHE_SPACE",
        "VLLM_CPU_OMP_THREADS_BIND",
        "OMP_NUM_THREADS",
    ],
)
def test_ordinary_vllm_settings_pass_the_secret_filter(name: str) -> None:
    spec = VllmSpec.model_validate({"engine": "vllm", "launch": launch(env={name: "1"})})
    assert spec.launch is not None and spec.launch.env == {name: "1"}


@pytest.mark.parametrize(
    "name",
    [
        "VLLM_PRIVATE_KEY_PEM",
        "VLLM_APIKEY",
        "NCCL_PASSPHRASE",
        "VLLM_AUTH_HEADER",
        "VLLM_S3_ACCESS_KEY_ID",
        "VLLM_HF_TOKEN_PATH",
        "VLLM_DB_PASSWORD",
    ],
)
def test_names_that_look_like_secrets_are_refused(name: str) -> None:
    with pytest.raises(ValidationError, match=f"{name} looks like a secret"):
        VllmSpec.model_validate({"engine": "vllm", "launch": launch(env={name: "x"})})


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["a", "b", "c"], "b\nc"),
        (
            ["x", "ValueError: too big", "y", "z", "See root cause above"],
            ("ValueError: too big\n...\nz\nSee root cause above"),
        ),
        (["RuntimeError: old", "ValueError: new", "q", "r"], "ValueError: new\n...\nq\nr"),
        (["p", "OSError: in the tail", "r"], "OSError: in the tail\nr"),
    ],
)
def test_a_log_tail_shows_the_root_cause_above_it(
    tmp_path: Path, lines: list[str], expected: str
) -> None:
    log = tmp_path / "vllm.log"
    log.write_text("\n".join(lines) + "\n")
    assert tail(log, lines=2) == expected
