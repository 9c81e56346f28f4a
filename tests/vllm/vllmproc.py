"""Real vLLM (the CPU build in .venv-vllm) for the `vllm` test tier: the tiny model it
serves, its offline environment, starting and stopping it, and reading the process tree,
its sockets and its /metrics from the outside (Linux /proc).

Nothing here imports vllm: the tests run in the project's venv and only start vLLM's own
interpreter (MEDSERVE_VLLM_PYTHON, default .venv-vllm/bin/python) as a subprocess.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT
from tests.serverproc import free_port

VLLM_PYTHON = Path(os.environ.get("MEDSERVE_VLLM_PYTHON") or ROOT / ".venv-vllm" / "bin" / "python")
# Generous: measured 26-49 s with --enforce-eager on an idle 2-core machine, 2-3x that
# under load; a dead process fails the wait at once.
START_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 60.0
SERVED_NAME = "tiny"
# The context the tiny model is served with: room for a request long enough (about 70 s
# of decoding here) that an abort is told apart from the request finishing.
MAX_MODEL_LEN = 16384
EOS_ID = 2
GREEDY: dict[str, Any] = {"temperature": 0}
# What medserve sends upstream besides a greedy client's fields, with the defaults of
# remote_config: sent to vLLM directly too, so both runs are the same computation.
UPSTREAM_EXTRAS: dict[str, Any] = {"top_p": 1.0, "repetition_penalty": 1.0, "min_p": 0.0}
# A chat template for the SentencePiece tokenizer (vLLM refuses chat without one).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tiny_model(out: Path) -> Path:
    """The quantize tests' tiny random Llama (tests/quant/conftest.py), made servable.

    Additions: a chat template; ``max_position_embeddings`` MAX_MODEL_LEN (RoPE has no
    learned positions, so this is configuration only); the EOS row of ``lm_head`` zeroed,
    so EOS always scores 0 and greedy decoding (temperature 0) never picks it over 511
    random logits: every greedy request runs to ``max_tokens`` (finish_reason ``length``),
    which makes token counts exact and a long request reliably long. Seconds to build.
    """
    from safetensors.torch import load_file, save_file

    from tests.quant.conftest import build_tiny

    build_tiny("llama", out)
    config = json.loads((out / "config.json").read_text())
    config["max_position_embeddings"] = MAX_MODEL_LEN
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer = json.loads((out / "tokenizer_config.json").read_text())
    tokenizer["chat_template"] = CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer, indent=2))
    weights = load_file(out / "model.safetensors")
    weights["lm_head.weight"][EOS_ID] = 0.0
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def offline_env(home: Path) -> dict[str, str]:
    """vLLM's environment: offline, no usage stats, loopback host IP, a 1 GiB KV cache, and
    every directory it writes (IPC sockets, caches, config, temp files) under ``home``."""
    dirs = {
        "VLLM_RPC_BASE_PATH": "ipc",
        "VLLM_CACHE_ROOT": "cache",
        "VLLM_CONFIG_ROOT": "config",
        "TORCHINDUCTOR_CACHE_DIR": "inductor",
        "TMPDIR": "tmp",
        "HF_HOME": "hf",
        "HOME": "home",
    }
    env = {name: str(home / sub) for name, sub in dirs.items()}
    for path in env.values():
        Path(path).mkdir(parents=True, exist_ok=True)
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        # Without it vLLM finds its host IP with a UDP connect to 8.8.8.8 (no packet sent,
        # but a non-loopback connect all the same).
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        **env,
    }


def remote_config(path: Path, model_id: str, url: str) -> Path:
    """Write a medserve config at ``path`` serving ``model_id`` from the vLLM server at
    ``url`` (a remote replica), with neutral sampling defaults (no top-k cut) so a greedy
    request through medserve is the same computation as one sent to vLLM directly."""
    path.write_text(
        f'[[models]]\nid = "{model_id}"\n'
        "[models.defaults]\ntop_k = 0\n"
        f'[[models.replicas]]\nengine = "vllm"\nurl = "{url}"\n'
        f'served_model_name = "{SERVED_NAME}"\nfirst_event_timeout_s = 120\n'
    )
    return path


def strace_usable() -> list[str] | None:
    """The strace argv prefix that traces connect() and bind() of a process tree, or None
    when strace is missing or may not trace here (no ptrace permission)."""
    if shutil.which("strace") is None:
        return None
    for fast in (["--seccomp-bpf"], []):
        cmd = ["strace", "-f", *fast, "-qq", "-e", "trace=connect,bind", "-o", os.devnull]
        done = subprocess.run([*cmd, "true"], capture_output=True, timeout=30, check=False)
        if done.returncode == 0:
            return cmd[:-2]
    return None


@dataclass
class VllmServer:
    url: str
    process: subprocess.Popen[bytes]  # vLLM's API server, or strace around it
    log: Path
    home: Path
    trace: Path | None  # strace's record of connect()/bind(), when traced
    port: int


def wait_ready(url: str, name: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Until ``url``/health is 200 and /v1/models lists ``name`` (bounded; fails at once,
    with the log's tail, when the process dies)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"vLLM exited {process.returncode}:\n{tail(log)}")
        with suppress(httpx.TransportError, ValueError):
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                models = httpx.get(f"{url}/v1/models", timeout=5).json()["data"]
                if any(m["id"] == name for m in models):
                    return
        if time.monotonic() > deadline:
            raise RuntimeError(f"vLLM not ready in {START_TIMEOUT_S} s:\n{tail(log)}")
        time.sleep(0.5)


def tail(log: Path, lines: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def running_vllm(
    python: Path, model: Path, home: Path, args: Iterable[str] = (), trace: bool = True
) -> Iterator[VllmServer]:
    """vLLM's OpenAI server (``python -m vllm.entrypoints.openai.api_server``, eager mode)
    for ``model``, served as SERVED_NAME on a free loopback port with ``args`` added and
    the environment of :func:`offline_env` under ``home``; under strace when ``trace`` and
    strace can. Stopped on exit, with every process of its tree."""
    port = free_port()
    log = home / "vllm.log"
    cmd = [
        str(python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--served-model-name", SERVED_NAME,
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "bfloat16", "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
        *args,
    ]  # fmt: skip
    strace = strace_usable() if trace else None
    trace_file = home / "connect.strace" if strace else None
    if strace and trace_file:
        cmd = [*strace, "-o", str(trace_file), *cmd]
    env = offline_env(home)
    with log.open("wb") as out:
        process = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = VllmServer(f"http://127.0.0.1:{port}", process, log, home, trace_file, port)
    try:
        wait_ready(server.url, SERVED_NAME, process, log)
        yield server
    finally:
        stop_tree(process.pid, traced=strace is not None)
        process.wait(timeout=STOP_TIMEOUT_S)


def stop_tree(root: int, traced: bool) -> None:
    """SIGTERM vLLM's API server (strace's child when ``traced``), wait for its whole tree
    to go (bounded), then SIGKILL whatever is left of it."""
    tree = [p for p in (Proc.of(root), *descendants(root)) if p is not None]
    server = next((p for p in tree if p.ppid == root), None) if traced else Proc.of(root)
    if server is not None:
        with suppress(ProcessLookupError):
            os.kill(server.pid, signal.SIGTERM)
    for proc in wait_gone(tree, STOP_TIMEOUT_S):
        with suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)


# --- processes, from /proc ---------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    """A process as /proc shows it; ``start`` (clock ticks after boot) tells it apart from a
    later process that reuses its pid."""

    pid: int
    ppid: int
    start: int
    state: str
    comm: str

    @classmethod
    def of(cls, pid: int) -> Proc | None:
        try:
            raw = Path(f"/proc/{pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return None
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        return cls(pid, int(fields[1]), int(fields[19]), fields[0], comm)

    def cmdline(self) -> str:
        try:
            return Path(f"/proc/{self.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # gone, or not ours to read
            return ""

    def environ(self) -> dict[str, str]:
        try:
            raw = Path(f"/proc/{self.pid}/environ").read_bytes()
        except OSError:  # gone, or not ours to read
            return {}
        pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0"))
        return {key: value for key, _, value in pairs if key}

    def alive(self) -> bool:
        """Still this process (same start time) and not a zombie waiting to be reaped."""
        now = Proc.of(self.pid)
        return now is not None and now.start == self.start and now.state not in ("Z", "X")

    def is_vllm(self) -> bool:
        return self.comm.startswith("VLLM") or "vllm.entrypoints" in self.cmdline()


def all_procs() -> list[Proc]:
    found = (Proc.of(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit())
    return [p for p in found if p is not None]


def descendants(root: int) -> list[Proc]:
    """Every live process below ``root`` (children, their children, ...)."""
    procs = all_procs()
    found: list[Proc] = []
    parents = {root}
    while True:
        more = [p for p in procs if p.ppid in parents and p not in found]
        if not more:
            return found
        found += more
        parents = {p.pid for p in more}


def wait_gone(procs: list[Proc], timeout_s: float) -> list[Proc]:
    """Poll (bounded) until none of ``procs`` is alive; returns those still alive."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = [p for p in procs if p.alive()]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


# --- sockets and the strace record -------------------------------------------------------

STRACE_ADDR = re.compile(
    r"\b(connect|bind)\(\d+, \{sa_family=AF_INET6?, .*?"
    r"(?:inet_addr\(\"([^\"]+)\"\)|inet_pton\(AF_INET6?, \"([^\"]+)\")"
)


def loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def traced_inet_calls(trace: str) -> list[tuple[str, str, str]]:
    """(call, address, line) of every IPv4/IPv6 connect() and bind() in an strace record."""
    calls = []
    for line in trace.splitlines():
        found = STRACE_ADDR.search(line)
        if found:
            calls.append((found.group(1), found.group(2) or found.group(3), line))
    return calls


def off_loopback(sockets: Iterable[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """The sockets of :func:`inet_sockets` bound or connected beyond loopback (a peer of
    0.0.0.0/:: means none: a listener or an unconnected UDP socket)."""
    return [
        s for s in sockets if not (loopback(s[1]) and (loopback(s[2]) or s[2] in ("0.0.0.0", "::")))
    ]


def _hex_ip(field: str) -> str:
    """An address of /proc/net/tcp* ("0100007F" or 32 hex digits, host byte order words)."""
    raw = bytes.fromhex(field)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


def inet_sockets(procs: Iterable[Proc]) -> list[tuple[str, str, str]]:
    """(kind, local address, remote address) of every TCP/UDP socket the processes hold
    open now (their fds matched against /proc/<pid>/net/{tcp,udp}{,6} by inode)."""
    found = []
    for proc in procs:
        inodes = set()
        with suppress(FileNotFoundError, ProcessLookupError, PermissionError):
            for fd in Path(f"/proc/{proc.pid}/fd").iterdir():
                with suppress(FileNotFoundError, ProcessLookupError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
        for kind in ("tcp", "tcp6", "udp", "udp6"):
            with suppress(FileNotFoundError, ProcessLookupError):
                rows = Path(f"/proc/{proc.pid}/net/{kind}").read_text().splitlines()[1:]
                for row in rows:
                    cols = row.split()
                    if cols[9] in inodes:
                        local, remote = cols[1].split(":")[0], cols[2].split(":")[0]
                        found.append((kind, _hex_ip(local), _hex_ip(remote)))
    return found


# --- /metrics ----------------------------------------------------------------------------


def scrape(url: str) -> dict[str, tuple[str, float]]:
    """vLLM's /metrics as {family name: (type, sum of its samples' values)} (the sample
    named as the family, or ``<family>_total`` for counters)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[str, tuple[str, float]] = {}
    for family in text_string_to_metric_families(text):
        wanted = {family.name, f"{family.name}_total"}
        total = sum(s.value for s in family.samples if s.name in wanted)
        out[family.name] = (family.type, total)
    return out


def gauge(url: str, name: str) -> float:
    return scrape(url)[name][1]


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``condition()`` until it is true, at most ``timeout_s``; AssertionError naming
    ``what`` when it never is."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.2)
