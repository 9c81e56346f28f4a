"""The processes of the gateway benchmark (tests/bench/gateway.py) and how they are measured.

* :func:`fake_upstream`: the fake vLLM (:mod:`tests.fakeupstream`) in its own process.
* :func:`medserve_gateway`: ``medserve serve`` with one remote ``vllm`` replica pointing at it,
  with or without the audit log; :data:`AUDIT_STORES` names the audit back ends measured.
* :func:`litellm_proxy`: LiteLLM's proxy from ``.venv-litellm`` (scripts/setup-litellm-venv.sh)
  with a generated config, offline (:data:`LITELLM_ENV`).
* :func:`pinned`: start processes on given CPUs (Linux affinity, inherited at fork).
* :func:`tree_cpu_seconds`: user + system CPU seconds of a process and its descendants, from
  /proc; :func:`busy_cpu_seconds`: how long given CPUs were busy, whoever ran on them.

Every server binds 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from medserve.auth.keys import KeyStore
from tests.serverproc import ROOT, free_port, running_process, running_server

MODEL = "med-gpu"  # medserve's id of the model
SERVED = "m"  # the upstream's --served-model-name, and the model name LiteLLM serves
LITELLM_VENV = ROOT / ".venv-litellm"
LITELLM_KEY = "sk-bench-0123456789abcdef"  # a fixed master key: LiteLLM checks it per request
LITELLM_STARTUP_TIMEOUT_S = 180  # its import alone takes ~10 s on this machine

# Audit back ends of medserve, each measured as its own target "medserve+<name>": the name
# and a context manager that yields the environment (MEDSERVE_*) selecting it, given the
# run's scratch directory (and holds what it needs, a database server, until the run ends).
# The report and the target checks pick every entry up.


@contextmanager
def sqlite_audit(tmp: Path) -> Iterator[dict[str, str]]:
    """The embedded default: an SQLite file in the scratch directory."""
    yield {"MEDSERVE_AUDIT__PATH": str(tmp / "audit-sqlite" / "audit.db")}


@contextmanager
def postgres_audit(tmp: Path) -> Iterator[dict[str, str]]:
    """A PostgreSQL of the run's own (tests/pg.py) with ``fsync=on``, durable as deployed,
    the schema migrated by the owner role, the gateway logging in as the gateway role."""
    from medserve.audit.pgstore import open_schema
    from tests import pg

    with pg.running(fsync=True) as server:
        db = server.database()
        with server.connect(db.name) as conn:
            conn.execute(f"SET ROLE {pg.OWNER}")
            open_schema(conn, db.owner_url, gateway_role=pg.GATEWAY, auditor_role=pg.AUDITOR)
        yield {
            "MEDSERVE_AUDIT__URL": db.gateway_url,
            "MEDSERVE_AUDIT__PATH": str(tmp / "audit-postgres" / "audit.db"),  # its keys
        }


def _audit_stores() -> dict[str, Callable[[Path], AbstractContextManager[dict[str, str]]]]:
    from tests import pg

    stores: dict[str, Callable[[Path], AbstractContextManager[dict[str, str]]]] = {
        "sqlite": sqlite_audit
    }
    if pg.find_bindir() is not None:  # PostgreSQL installed (scripts/ensure-postgres.sh)
        stores["postgres"] = postgres_audit
    return stores


AUDIT_STORES = _audit_stores()

# LiteLLM's process environment, as well as the config's settings, keep it offline:
# telemetry vetoed (LITELLM_TELEMETRY_DISABLED in this release, LITELLM_TELEMETRY in older
# ones), the model cost map read from the package instead of GitHub, and every client that
# honours the proxy variables sent to a closed loopback port except for 127.0.0.1, so a call
# home fails instead of leaving the machine. No DATABASE_URL: no Prisma, no spend logs.
LITELLM_ENV = {
    "LITELLM_TELEMETRY": "False",
    "LITELLM_TELEMETRY_DISABLED": "true",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost",
}


@dataclass(frozen=True)
class Endpoint:
    """Where the load generator sends one target's requests.

    ``pid``: the server process whose CPU (with its descendants') is charged to the target;
    None for the upstream asked directly (its CPU is the client side's)."""

    name: str
    url: str
    model: str
    key: str | None
    pid: int | None


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and every live descendant so far, each with the
    CPU of the children it has reaped (``/proc/<pid>/stat`` fields 14-17, clock ticks).

    Raises ``FileNotFoundError`` when ``pid`` itself is gone."""
    table: dict[int, tuple[int, int]] = {}  # pid -> (parent, ticks)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited while we looked
        table[int(entry.name)] = (int(fields[1]), sum(int(f) for f in fields[11:15]))
    if pid not in table:
        raise FileNotFoundError(f"no process {pid}")
    children: dict[int, list[int]] = {}
    for child, (parent, _) in table.items():
        children.setdefault(parent, []).append(child)
    ticks, todo = 0, [pid]
    while todo:
        p = todo.pop()
        ticks += table[p][1]
        todo += children.get(p, [])
    return ticks / os.sysconf("SC_CLK_TCK")


def self_cpu_seconds() -> float:
    """User + system CPU seconds of this process (all its threads) so far."""
    t = os.times()
    return t.user + t.system


def busy_cpu_seconds(cpus: set[int]) -> float:
    """CPU seconds the given CPUs have spent busy since boot, for every process on the machine
    (``/proc/stat`` per-CPU lines: all of the first eight fields but idle and iowait)."""
    ticks = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            v = [int(x) for x in values[:8]]
            ticks += sum(v) - v[3] - v[4]
    return ticks / os.sysconf("SC_CLK_TCK")


def allowed_cpus(pid: int) -> str:
    """The ``Cpus_allowed_list`` of ``pid`` (as /proc shows it, e.g. ``"0"`` or ``"0-1"``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    return "?"


def parse_cpus(text: str) -> set[int]:
    """``"0,2-3"`` -> ``{0, 2, 3}``. Raises ``ValueError`` on anything else."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


@contextmanager
def pinned(cpus: set[int] | None) -> Iterator[None]:
    """Within the block this thread, and every process it starts (affinity is inherited at
    fork), runs only on ``cpus``; the thread's own affinity is restored after. None: no-op."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@contextmanager
def fake_upstream(tmp: Path, knobs: dict[str, object]) -> Iterator[tuple[str, int]]:
    """The fake vLLM upstream in its own process; yields its base URL and pid."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "tests.fakeupstream", "--port", str(port)]
    cmd += ["--knobs", json.dumps(knobs)]
    env = {"PYTHONPATH": str(ROOT)}
    with running_process(cmd, tmp / "upstream.log", f"{url}/health", env) as process:
        yield url, process.pid


@contextmanager
def medserve_gateway(
    tmp: Path, name: str, upstream: str, max_outstanding: int, audit: dict[str, str] | None
) -> Iterator[Endpoint]:
    """``medserve serve`` with one vllm replica at ``upstream``, asked with a real key (made
    as ``medserve keys create`` makes one), access log on as deployed; audit log as ``audit``
    says (the environment of an :data:`AUDIT_STORES` entry), or off when None."""
    home = tmp / name
    home.mkdir(parents=True)
    keys = home / "keys.db"
    _, token = KeyStore(keys).create("bench", "user", [MODEL])
    config = home / "gateway.toml"
    config.write_text(
        f'[[models]]\nid = "{MODEL}"\n[[models.replicas]]\nengine = "vllm"\n'
        f'url = "{upstream}"\nserved_model_name = "{SERVED}"\n'
        f"max_outstanding = {max_outstanding}\n"
    )
    env = {"MEDSERVE_AUTH__KEYS_PATH": str(keys), "PYTHONPATH": str(ROOT)}
    env.update(audit if audit is not None else {"MEDSERVE_AUDIT__ENABLED": "false"})
    with running_server(home / "medserve.log", "-c", str(config), env=env) as server:
        yield Endpoint(name, server.url, MODEL, token, server.process.pid)


def litellm_unavailable(venv: Path = LITELLM_VENV) -> str | None:
    """Why LiteLLM's proxy cannot be measured (None: it can): the venv that
    scripts/setup-litellm-venv.sh makes is missing or unfinished."""
    if not (venv / ".installed-litellm").is_file() or not (venv / "bin" / "litellm").is_file():
        return f"{venv} is not ready (scripts/setup-litellm-venv.sh makes it; see its message)"
    return None


def litellm_version(venv: Path = LITELLM_VENV) -> str:
    """The installed litellm version, from the venv's dist-info directory name."""
    found = sorted(venv.glob("lib/python*/site-packages/litellm-*.dist-info"))
    return found[0].name.removeprefix("litellm-").removesuffix(".dist-info") if found else "?"


def litellm_config(upstream: str) -> str:
    """LiteLLM's proxy config (YAML): one model ``m`` through the OpenAI-compatible provider
    at ``upstream``; a fixed master key and no database (only that key is accepted, nothing
    is stored); LiteLLM's defaults otherwise (one uvicorn worker on uvloop, INFO access log)."""
    return (
        "model_list:\n"
        f"  - model_name: {SERVED}\n"
        "    litellm_params:\n"
        f"      model: openai/{SERVED}\n"
        f"      api_base: {upstream}/v1\n"
        "      api_key: none\n"
        "general_settings:\n"
        f"  master_key: {LITELLM_KEY}\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
    )


@contextmanager
def litellm_proxy(tmp: Path, upstream: str, venv: Path = LITELLM_VENV) -> Iterator[Endpoint]:
    """LiteLLM's proxy (``litellm --config``, one worker) on a free loopback port, in front of
    ``upstream``; ready when ``/health/liveliness`` answers. Raises ``RuntimeError`` (with its
    log) if it exits or is not ready within LITELLM_STARTUP_TIMEOUT_S."""
    home = tmp / "litellm"
    home.mkdir(parents=True)
    config = home / "config.yaml"
    config.write_text(litellm_config(upstream))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(venv / "bin" / "litellm"), "--config", str(config)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    # Its own venv only: nothing of medserve's environment (PYTHONPATH) leaks in.
    env = {**LITELLM_ENV, "PYTHONPATH": "", "HOME": str(home)}
    with running_process(
        cmd,
        home / "litellm.log",
        f"{url}/health/liveliness",
        env,
        startup_timeout_s=LITELLM_STARTUP_TIMEOUT_S,
    ) as process:
        yield Endpoint("litellm", url, SERVED, LITELLM_KEY, process.pid)
