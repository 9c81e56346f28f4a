"""A fake vLLM server process, for the supervisor's tests: vLLM's command line, the fake
OpenAI upstream (:mod:`tests.fakeupstream`) behind vLLM's VLLM_API_KEY check, and a child
named ``VLLM::EngineCore`` standing in for vLLM's engine process.

Run as ``python tests/fakevllm.py --model DIR --served-model-name NAME --host H --port P
[--no-enable-log-requests --dtype D --max-model-len N --enforce-eager]``: what the
supervisor appends to a ``launch.command``. Any other argument exits 2 through argparse,
as vLLM does. Its behaviour comes from files in DIR (the supervised child gets no test
environment):

- ``plan.json``: a list of knobs per start; start N uses entry N-1, the last one repeats.
  ``{"exit": CODE}`` exits with CODE before serving; ``{"startup_s": S}`` waits S seconds
  before listening; ``{"ignore_term": true}`` makes the server ignore SIGTERM;
  ``{"engine_ignores_term": true}`` the same for the engine child.
- ``starts.jsonl`` (written): one line per start, before the arguments are parsed:
  ``pid``, ``argv``, ``env`` (the whole environment), then one line with the ``engine``
  pid once it runs (:func:`starts` reads them).

The tests find an instance's processes by the model directory on their command line
(:func:`instance_processes`), independently of the supervisor's own bookkeeping.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FAKE = Path(__file__).resolve()
ENGINE = """
import ctypes, signal, sys
ctypes.CDLL(None).prctl(15, ctypes.create_string_buffer(b"VLLM::EngineCore"), 0, 0, 0)
if sys.argv[1] == "1":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
while True:
    signal.pause()
"""


def instance_processes(model: Path) -> dict[int, str]:
    """pid → comm of every live process whose command line names ``model``."""
    found = {}
    needle = str(model).encode()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            stat = Path(f"/proc/{name}/stat").read_text()
            comm = Path(f"/proc/{name}/comm").read_text().strip()
        except OSError:
            continue
        if needle in cmdline.split(b"\0") and stat.rpartition(")")[2].split()[0] not in "ZX":
            found[int(name)] = comm
    return found


def starts(model: Path) -> list[dict[str, Any]]:
    """The fake's start records (``pid``, ``argv``, ``env``), with ``engine`` merged in."""
    lines = [json.loads(line) for line in (model / "starts.jsonl").read_text().splitlines()]
    runs: list[dict[str, Any]] = []
    for line in lines:
        if "argv" in line:
            runs.append(line)
        else:
            runs[-1]["engine"] = line["engine"]
    return runs


def model_dir(argv: list[str]) -> Path:
    """``--model``'s value, found before argparse runs (it may exit)."""
    for i, arg in enumerate(argv):
        if arg == "--model" and i + 1 < len(argv):
            return Path(argv[i + 1])
    raise SystemExit("fakevllm: no --model")


def record(directory: Path, entry: dict[str, Any]) -> int:
    """Append ``entry`` to starts.jsonl; the number of starts so far (this one included)."""
    with (directory / "starts.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
    lines = (directory / "starts.jsonl").read_text(encoding="utf-8").splitlines()
    return sum(1 for line in lines if "argv" in json.loads(line))


def knobs(directory: Path, start: int) -> dict[str, Any]:
    path = directory / "plan.json"
    plan: list[dict[str, Any]] = json.loads(path.read_text()) if path.is_file() else [{}]
    return plan[min(start, len(plan)) - 1]


def main() -> None:
    directory = model_dir(sys.argv)
    start = record(directory, {"pid": os.getpid(), "argv": sys.argv, "env": dict(os.environ)})
    parser = argparse.ArgumentParser(prog="vllm")
    parser.add_argument("--model", required=True)
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--no-enable-log-requests", action="store_true")
    parser.add_argument("--dtype")
    parser.add_argument("--max-model-len", type=int, default=256)
    parser.add_argument("--enforce-eager", action="store_true")
    args = parser.parse_args()
    plan = knobs(directory, start)
    print(f"fake vllm: start {start} on {args.host}:{args.port}", flush=True)
    if "exit" in plan:
        print(f"fake vllm: exiting with {plan['exit']}", file=sys.stderr, flush=True)
        sys.exit(int(plan["exit"]))
    engine = subprocess.Popen(
        [sys.executable, "-c", ENGINE, "1" if plan.get("engine_ignores_term") else "0", args.model],
        stdin=subprocess.DEVNULL,
    )
    record(directory, {"engine": engine.pid})
    time.sleep(float(plan.get("startup_s", 0)))
    serve(args, bool(plan.get("ignore_term")))
    engine.terminate()
    print("fake vllm: stopped", flush=True)


def serve(args: argparse.Namespace, ignore_term: bool) -> None:
    """The fake upstream under uvicorn, on the given port, until SIGTERM (or forever)."""
    sys.path.insert(0, str(ROOT))
    import uvicorn

    from tests.fakeupstream import FakeUpstream, Knobs

    upstream = FakeUpstream()
    upstream.knobs = Knobs(served=args.served_model_name, context=args.max_model_len)
    key = os.environ.get("VLLM_API_KEY", "")

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = dict(scope.get("headers") or [])
        guarded = scope["type"] == "http" and scope["path"].startswith("/v1") and key
        if guarded and headers.get(b"authorization") != f"Bearer {key}".encode():
            await send({"type": "http.response.start", "status": 401, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})
            return
        await upstream(scope, receive, send)

    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_config=None, lifespan="off", access_log=False
    )

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not ignore_term:
                super().handle_exit(sig, frame)

    if ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Server(config).run()


if __name__ == "__main__":
    main()
