"""The vLLM relay's cost: a fake vLLM upstream asked directly vs through medserve, one run.

One fake OpenAI upstream (:mod:`tests.fakeupstream`) in its own process, with a fixed time
to first token and a fixed delay between tokens, and one ``medserve serve`` process with a
remote ``vllm`` replica pointing at it, asked with a real key (made as ``medserve keys
create`` makes one; audit log and access log on, as deployed). The same load generator
(:func:`medserve.bench.run`: httpx, chat, timed client-side) asks both, direct and through
alternating within every round, streaming and not, at each concurrency, after a warm-up.

Per run: time to first token (TTFT, to the first content delta) p50 and mean, inter-token
latency (ITL, every gap between content deltas) p50 and mean, end-to-end latency p50 (the
only number of a non-streaming run); the table shows medians over the rounds, the ratio
through / direct and the difference in ms. A relay that buffers shows as ITL falling
below the upstream's token delay and TTFT rising. medserve's CPU seconds (user + system
of its process, from /proc) per 1000 requests come from each through run.

The client, the upstream and medserve share the machine's cores: at high concurrency
every side is slowed by the others, so compare the ratio, not the absolute numbers.

    .venv/bin/python tests/bench/gateway.py [--levels 1,16] [--rounds 3] [--per-user 12]
        [--tokens 32] [--token-delay-ms 10] [--ttft-ms 20] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from medserve import bench
from medserve.auth.keys import KeyStore
from tests.serverproc import ROOT, Server, free_port, running_process, running_server

MODEL = "med-gpu"  # medserve's id of the model
SERVED = "m"  # the upstream's --served-model-name
# Far more words than any budget: every request generates exactly --tokens tokens.
WORDS = " ".join(f"w{i}" for i in range(4096))
TARGETS = ("direct", "through")


@dataclass
class Run:
    """One run's client-side numbers (seconds) and, through medserve, its CPU seconds."""

    requests: int
    completed: int
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    cpu_s: float | None = None

    def stats(self) -> dict[str, float | None]:
        def p50(values: list[float]) -> float | None:
            return statistics.median(values) if values else None

        def mean(values: list[float]) -> float | None:
            return statistics.fmean(values) if values else None

        per_1k = None if self.cpu_s is None else self.cpu_s / max(self.completed, 1) * 1000
        return {
            "ttft_p50": p50(self.ttft),
            "ttft_mean": mean(self.ttft),
            "itl_p50": p50(self.itl),
            "itl_mean": mean(self.itl),
            "latency_p50": p50(self.latency),
            "cpu_s_per_1k": per_1k,
        }


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def fake_upstream(tmp: Path, knobs: dict[str, Any]) -> Iterator[str]:
    """The fake upstream in its own process; yields its base URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "tests.fakeupstream", "--port", str(port)]
    cmd += ["--knobs", json.dumps(knobs)]
    with running_process(cmd, tmp / "upstream.log", f"{url}/health", {"PYTHONPATH": str(ROOT)}):
        yield url


@contextmanager
def gateway(tmp: Path, upstream: str, max_outstanding: int) -> Iterator[tuple[Server, str]]:
    """``medserve serve`` with one vllm replica at ``upstream``; yields it and a real key."""
    keys = tmp / "keys.db"
    _, token = KeyStore(keys).create("bench", "user", [MODEL])
    config = tmp / "gateway.toml"
    config.write_text(
        f'[[models]]\nid = "{MODEL}"\n[[models.replicas]]\nengine = "vllm"\n'
        f'url = "{upstream}"\nserved_model_name = "{SERVED}"\n'
        f"max_outstanding = {max_outstanding}\n"
    )
    env = {"MEDSERVE_AUTH__KEYS_PATH": str(keys), "PYTHONPATH": str(ROOT)}
    with running_server(tmp / "medserve.log", "-c", str(config), env=env) as server:
        yield server, token


async def one_run(
    url: str,
    model: str,
    key: str | None,
    concurrency: int,
    requests: int,
    stream: bool,
    tokens: int,
) -> Run:
    samples: list[bench.Sample] = []
    report = await bench.run(
        url,
        model,
        concurrency=concurrency,
        requests=requests,
        max_tokens=tokens,
        prompts=list(bench.DEFAULT_PROMPTS),
        stream=stream,
        api_key=key,
        request_timeout_s=120,
        time_limit_s=600,
        on_done=samples.append,
    )
    ok = [s for s in samples if s.ok]
    return Run(
        requests=report.requests,
        completed=report.completed,
        ttft=[s.ttft_s for s in ok if s.ttft_s is not None],
        itl=[gap for s in ok for gap in s.itl_s],
        latency=[s.latency_s for s in ok],
    )


Key = tuple[str, int, str]  # (mode, concurrency, target)


def measure(args: argparse.Namespace, tmp: Path) -> dict[Key, list[Run]]:
    levels = [int(c) for c in args.levels.split(",")]
    knobs = {
        "served": SERVED,
        "context": 1 << 20,
        "text": WORDS,
        "ttft_s": args.ttft_ms / 1000,
        "token_delay_s": args.token_delay_ms / 1000,
    }
    runs: dict[Key, list[Run]] = {}
    with (
        fake_upstream(tmp, knobs) as upstream,
        gateway(tmp, upstream, max(levels)) as (server, key),
    ):
        pid = server.process.pid
        where = {"direct": (upstream, SERVED, None), "through": (server.url, MODEL, key)}

        def go(target: str, c: int, n: int, stream: bool) -> Run:
            url, model, token = where[target]
            before = cpu_seconds(pid)
            run = asyncio.run(one_run(url, model, token, c, n, stream, args.tokens))
            if target == "through":
                run.cpu_s = cpu_seconds(pid) - before
            if run.completed != run.requests:
                raise SystemExit(f"{target} c={c}: {run.requests - run.completed} failed")
            return run

        for target in TARGETS:  # warm-up: connections, imports, caches
            for stream in (True, False):
                go(target, max(levels), max(levels), stream)
        for r in range(args.rounds):
            # The first target alternates between rounds: neither side always goes first.
            order = TARGETS if r % 2 == 0 else TARGETS[::-1]
            for stream in (True, False):
                mode = "stream" if stream else "non-stream"
                for c in levels:
                    for target in order:
                        run = go(target, c, c * args.per_user, stream)
                        runs.setdefault((mode, c, target), []).append(run)
    return runs


def medians(runs: list[Run]) -> dict[str, float | None]:
    per = [r.stats() for r in runs]
    out: dict[str, float | None] = {}
    for name in per[0]:
        values = [v for s in per if (v := s[name]) is not None]
        out[name] = statistics.median(values) if values else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="1,16", help="comma-separated concurrencies")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-user", type=int, default=12, help="requests per concurrent user")
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens of every request")
    parser.add_argument("--token-delay-ms", type=float, default=10.0)
    parser.add_argument("--ttft-ms", type=float, default=20.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as t:
        runs = measure(args, Path(t))
    table = {key: medians(rs) for key, rs in runs.items()}
    if args.json:
        rows = [{"mode": m, "c": c, "target": t, **v} for (m, c, t), v in table.items()]
        print(json.dumps({"args": vars(args), "rows": rows}, indent=2))
        return
    print(
        f"fake vLLM upstream: TTFT {args.ttft_ms:g} ms, {args.token_delay_ms:g} ms/token, "
        f"{args.tokens} tokens/request, chat; medians of {args.rounds} rounds, "
        f"{args.per_user} requests per concurrent user; {os.cpu_count()} CPUs"
    )
    head = f"{'mode':<10} {'c':>3} {'target':<8}"
    print(
        f"{head} {'TTFT p50':>9} {'mean':>7} {'ITL p50':>8} {'mean':>7} {'e2e p50':>8} "
        f"{'CPU s/1k':>9}"
    )

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.2f}"

    for (mode, c, target), v in sorted(table.items()):
        cpu = "" if v["cpu_s_per_1k"] is None else f"{v['cpu_s_per_1k']:.2f}"
        print(
            f"{mode:<10} {c:>3} {target:<8} {ms(v['ttft_p50']):>9} {ms(v['ttft_mean']):>7} "
            f"{ms(v['itl_p50']):>8} {ms(v['itl_mean']):>7} {ms(v['latency_p50']):>8} {cpu:>9}"
        )
    print("through / direct (ratio, and difference in ms):")
    for mode, c, target in sorted(table):
        if target != "through":
            continue
        a, b = table[(mode, c, "through")], table[(mode, c, "direct")]
        parts = []
        for name in ("ttft_p50", "ttft_mean", "itl_p50", "itl_mean", "latency_p50"):
            x, y = a[name], b[name]
            if x is not None and y is not None and y > 0:
                parts.append(f"{name} x{x / y:.3f} ({(x - y) * 1000:+.2f} ms)")
        print(f"  {mode:<10} c={c:<3} " + ", ".join(parts))


if __name__ == "__main__":
    main()
