"""What a gateway adds in front of a fast vLLM: direct vs medserve (audit off, audit on) vs
LiteLLM's proxy, one run (issue 17; ``make bench-gateway``).

One fake vLLM upstream (:mod:`tests.fakeupstream`: fixed time to first token, fixed delay
between tokens, ``--tokens`` tokens per answer) in its own process, asked by the same load
generator (:func:`medserve.bench.run`: httpx, chat, one keep-alive connection per simulated
user, timed client-side) as these targets:

* ``direct``: the upstream itself, the baseline;
* ``medserve``: ``medserve serve`` with one remote ``vllm`` replica on it, audit log off;
* ``medserve+sqlite``: the same with the audit log on (SQLite), and one more such target per
  entry of :data:`tests.bench.gateway_peers.AUDIT_STORES` (SQLite, and PostgreSQL when installed);
* ``litellm``: LiteLLM's proxy (the pinned release in ``.venv-litellm``, made by
  scripts/setup-litellm-venv.sh; skipped, with the reason, when that venv is not ready):
  its OpenAI-compatible provider (``openai/m``, ``api_base`` the upstream), LiteLLM's
  defaults otherwise (one uvicorn worker), a fixed master key, no database, telemetry off,
  offline (:data:`tests.bench.gateway_peers.LITELLM_ENV`, :func:`~tests.bench.gateway_peers.
  litellm_config`).

medserve is asked with a real key (made as ``medserve keys create`` makes one), access log and
its defaults on, as deployed (so also its per-request ``POST /tokenize`` budget check: the
bench always sends ``max_tokens``). Every target runs at each concurrency (``--levels``,
default 1 and 64), streaming and not, in ``--rounds`` rounds after a warm-up. Within a round
the runs of one (mode, concurrency) follow each other, the order of the targets rotating from
round to round so that none always goes first. Each run is ``max(c * --per-user,
--min-requests)`` requests, preceded by ``--prime`` unmeasured waves of c requests (a gateway
that idled while the others ran may have let its pools go: LiteLLM's first burst after an idle
spell is several times slower). The workers' first requests are spread over one answer's
duration, so arrivals are steady instead of lock-step waves of 64.

Numbers, per run, then the median over rounds: end-to-end latency p50 and p99; time to first
token (TTFT, to the first content delta) p50 and inter-token latency (ITL, every gap between
content deltas) p50; requests/s (completed / wall time of the run); the server's CPU
milliseconds per request (user + system of its process and all its descendants, from
/proc/<pid>/stat: worker processes count; clock ticks, so +-20 ms per run: at c=1 it is
coarse and includes the gateway's idle background work). Each target is paired with
``direct`` of the same round (added p50/p99 in ms, TTFT/ITL ratios) and the medians of those
paired numbers are shown. At c=1 a run's p99 comes from ``--min-requests`` samples: about
their largest.

Keeping the load generator from starving the gateway (2 cores here): every gateway process is
pinned to its own CPU(s) (``--server-cpus``, default the last CPU this process may use) and
the load generator and the upstream share the others (``--client-cpus``, default the rest);
the upstream stands for a GPU server, so it must not take the gateway's core either. Affinity
is set on this thread just before each process is started (``sched_setaffinity``, inherited
by its threads and children) and is read back per process into the header. Each side is also
measured, per run: "gw busy" is the gateway's CPU seconds per wall second of its cores,
"client" the load generator's plus the upstream's on theirs (flagged ``!`` above 90 %: that
run measured the client side, not the gateway), and "others" how much of the gateway's cores
any other process took (other jobs on a shared machine, the idle gateways' polling), from
/proc/stat. ``--no-pin`` turns pinning off.

The default shape (16 tokens, TTFT 20 ms, 40 ms between tokens; at c=64 about 100 answers/s
and 1,700 token events/s) keeps the client side near half of one core here: httpx and the
fake upstream cost together ~6 ms of CPU per streamed answer, so the 10 ms/token, 32-token
shape (6,400 events/s at c=64) saturates the client core and makes ``direct`` itself slow.
With more cores, pass a faster shape. Requests/s at c=64 can never exceed the upstream's
(64 / one answer's duration, shown as ``direct``): in the default shape medserve keeps up
with the upstream and only LiteLLM saturates its core, so the requests/s target is judged
in a second run (``make bench-gateway`` does both) with a 2 ms upstream (``--levels 64
--ttft-ms 2 --token-delay-ms 2 --judge throughput``), where every gateway's core is the
limit; there the client core saturates too (``!``), which caps ``direct``, not the gateways.
The LiteLLM comparison also shows the ratio of server CPU per request.

The issue's targets are printed with PASS/FAIL marks: added p50 at c=1, non-streaming, audit
on <= 1 ms; TTFT and ITL p50 through medserve (audit on) / direct at c=64 <= 1.05 (ITL also
>= 0.95: far below, the tokens arrive in clumps); p50 at c=64 audit on / off <= 1.05 (both
modes); requests/s at c=64 audit on / LiteLLM >= 3 (both modes). Other jobs on a shared
machine compete for every core: compare ratios within one run, not numbers across runs.

    .venv/bin/python tests/bench/gateway.py [--levels 1,64] [--rounds 3] [--per-user 4]
        [--min-requests 16] [--prime 1] [--tokens 16] [--token-delay-ms 40] [--ttft-ms 20]
        [--no-litellm] [--no-pin | --server-cpus 1 --client-cpus 0]
        [--judge all|latency|throughput] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from medserve import bench
from tests.bench.gateway_peers import (
    AUDIT_STORES,
    LITELLM_ENV,
    SERVED,
    Endpoint,
    allowed_cpus,
    busy_cpu_seconds,
    fake_upstream,
    litellm_proxy,
    litellm_unavailable,
    litellm_version,
    medserve_gateway,
    parse_cpus,
    pinned,
    self_cpu_seconds,
    tree_cpu_seconds,
)

# Far more words than any budget: every request generates exactly --tokens tokens.
WORDS = " ".join(f"w{i}" for i in range(4096))
MODES = ("stream", "non-stream")
DIRECT, AUDIT_OFF, LITELLM = "direct", "medserve", "litellm"
BUSY_FLAG = 0.9  # a client side busier than this measured itself as much as the gateway

Key = tuple[str, int, str]  # (mode, concurrency, target)
Stats = dict[str, float | None]


def audited(store: str) -> str:
    """The target name of medserve with the audit log in ``store`` (an AUDIT_STORES key)."""
    return f"{AUDIT_OFF}+{store}"


@dataclass
class Run:
    """One run: client-side samples (seconds), CPU seconds of each side, wall time."""

    requests: int
    completed: int
    errors: dict[str, int]
    wall_s: float
    rps: float
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    server_cpu_s: float | None = None
    client_cpu_s: float = 0.0  # this process (the load generator) plus the upstream's tree
    # Busy seconds of the gateway's CPUs, everyone's (None: not pinned): minus server_cpu_s,
    # what other processes took from the gateway meanwhile.
    server_core_s: float | None = None

    def stats(self, server_cpus: int, client_cpus: int) -> Stats:
        """p50/p99 latency, TTFT/ITL p50 (s), req/s, server CPU ms per request, and how busy
        each side kept its CPUs (CPU seconds per wall second per CPU, 0..1), and how much of
        the gateway's CPUs other processes took (0..1)."""
        lat = bench.percentiles(self.latency, (50, 99))
        per_req = self.server_cpu_s
        others = None
        if self.server_core_s is not None:
            others = max(self.server_core_s - (per_req or 0.0), 0.0) / self.wall_s / server_cpus
        return {
            "p50": lat.get("p50"),
            "p99": lat.get("p99"),
            "ttft_p50": statistics.median(self.ttft) if self.ttft else None,
            "itl_p50": statistics.median(self.itl) if self.itl else None,
            "rps": self.rps,
            "cpu_ms_per_req": None if per_req is None else per_req * 1000 / max(self.completed, 1),
            "server_busy": None if per_req is None else per_req / self.wall_s / server_cpus,
            "client_busy": self.client_cpu_s / self.wall_s / client_cpus,
            "others": others,
        }


@dataclass
class Measured:
    """Everything one benchmark run measured, and how it was set up."""

    runs: dict[Key, list[Run]]
    targets: list[str]
    levels: list[int]
    server_cpus: set[int] | None
    client_cpus: set[int] | None
    affinity: dict[str, str]  # process -> Cpus_allowed_list
    litellm: str  # its version, or why it was skipped

    def stats(self, key: Key) -> list[Stats]:
        """:meth:`Run.stats` of each round's run of ``key``."""
        n_server = len(self.server_cpus) if self.server_cpus else os.cpu_count() or 1
        n_client = len(self.client_cpus) if self.client_cpus else os.cpu_count() or 1
        return [r.stats(n_server, n_client) for r in self.runs[key]]


def cpu_plan(args: argparse.Namespace) -> tuple[set[int] | None, set[int] | None]:
    """(server CPUs, client CPUs), or (None, None) when not pinning (``--no-pin``, or one CPU)."""
    mine = sorted(os.sched_getaffinity(0))
    if args.no_pin or len(mine) < 2:
        return None, None
    server = parse_cpus(args.server_cpus) if args.server_cpus else {mine[-1]}
    client = parse_cpus(args.client_cpus) if args.client_cpus else set(mine) - server
    if not server or not client or server & client:
        raise SystemExit(f"--server-cpus {server} and --client-cpus {client} must not overlap")
    return server, client


async def one_run(
    ep: Endpoint, concurrency: int, requests: int, stream: bool, tokens: int, ramp_s: float = 0.0
) -> Run:
    samples: list[bench.Sample] = []
    report = await bench.run(
        ep.url,
        ep.model,
        concurrency=concurrency,
        requests=requests,
        max_tokens=tokens,
        prompts=list(bench.DEFAULT_PROMPTS),
        stream=stream,
        api_key=ep.key,
        request_timeout_s=120,
        time_limit_s=600,
        on_done=samples.append,
        ramp_s=ramp_s,
    )
    ok = [s for s in samples if s.ok]
    return Run(
        requests=report.requests,
        completed=report.completed,
        errors=report.errors,
        wall_s=report.duration_s,
        rps=report.requests_per_s,
        ttft=[s.ttft_s for s in ok if s.ttft_s is not None],
        itl=[gap for s in ok for gap in s.itl_s],
        latency=[s.latency_s for s in ok],
    )


def measure(args: argparse.Namespace, tmp: Path) -> Measured:
    levels = [int(c) for c in args.levels.split(",")]
    knobs = {
        "served": SERVED,
        "context": 1 << 20,
        "text": WORDS,
        "ttft_s": args.ttft_ms / 1000,
        "token_delay_s": args.token_delay_ms / 1000,
    }
    server_cpus, client_cpus = cpu_plan(args)
    # One answer's duration: workers started that far apart arrive at a steady rate.
    ramp = (args.ttft_ms + (args.tokens - 1) * args.token_delay_ms) / 1000
    runs: dict[Key, list[Run]] = {}
    skipped = "not asked (--no-litellm)" if args.no_litellm else litellm_unavailable()
    with ExitStack() as stack:
        with pinned(client_cpus):
            upstream, upstream_pid = stack.enter_context(fake_upstream(tmp, knobs))
        endpoints = [Endpoint(DIRECT, upstream, SERVED, None, None)]
        with pinned(server_cpus):
            gateway = medserve_gateway(tmp, AUDIT_OFF, upstream, max(levels), None)
            endpoints.append(stack.enter_context(gateway))
            for store, audit_env in AUDIT_STORES.items():
                env = stack.enter_context(audit_env(tmp))
                gateway = medserve_gateway(tmp, audited(store), upstream, max(levels), env)
                endpoints.append(stack.enter_context(gateway))
            if skipped is None:
                try:
                    endpoints.append(stack.enter_context(litellm_proxy(tmp, upstream)))
                except RuntimeError as e:  # its log is in the message: keep the last lines
                    skipped = "did not start: " + " | ".join(str(e).splitlines()[-3:])
        stack.enter_context(pinned(client_cpus))  # the load generator from here on
        affinity = {"load generator": allowed_cpus(os.getpid())}
        affinity["upstream"] = allowed_cpus(upstream_pid)
        affinity.update({ep.name: allowed_cpus(ep.pid) for ep in endpoints if ep.pid})

        def go(ep: Endpoint, c: int, n: int, stream: bool) -> Run:
            if args.prime:  # unmeasured: pools and caches sized for c, whatever ran before
                asyncio.run(one_run(ep, c, c * args.prime, stream, args.tokens))
            server_before = tree_cpu_seconds(ep.pid) if ep.pid else 0.0
            client_before = self_cpu_seconds() + tree_cpu_seconds(upstream_pid)
            core_before = busy_cpu_seconds(server_cpus) if server_cpus else 0.0
            run = asyncio.run(one_run(ep, c, n, stream, args.tokens, ramp))
            run.client_cpu_s = self_cpu_seconds() + tree_cpu_seconds(upstream_pid) - client_before
            if server_cpus:
                run.server_core_s = busy_cpu_seconds(server_cpus) - core_before
            if ep.pid:
                run.server_cpu_s = tree_cpu_seconds(ep.pid) - server_before
            if not run.completed:
                raise SystemExit(f"{ep.name} c={c}: every request failed: {run.errors}")
            return run

        top = max(levels)
        for ep in endpoints:  # warm-up: connections, lazy imports, caches
            for stream in (True, False):
                go(ep, top, 2 * top, stream)
        for r in range(args.rounds):
            order = endpoints[r % len(endpoints) :] + endpoints[: r % len(endpoints)]
            for mode in MODES:
                for c in levels:
                    n = max(c * args.per_user, args.min_requests)
                    for ep in order:
                        run = go(ep, c, n, mode == "stream")
                        runs.setdefault((mode, c, ep.name), []).append(run)
            if not args.json:
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    return Measured(
        runs=runs,
        targets=[ep.name for ep in endpoints],
        levels=levels,
        server_cpus=server_cpus,
        client_cpus=client_cpus,
        affinity=affinity,
        litellm=f"skipped: {skipped}" if skipped else litellm_version(),
    )


def median(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def diff_ms(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else (a - b) * 1000


def summarize(m: Measured) -> dict[Key, Stats]:
    """Per (mode, c, target): medians over rounds of each run's stats and of the paired
    comparisons with ``direct`` of the same round (added_p50_ms, added_p99_ms, ttft_x, itl_x)."""
    per_round = {k: m.stats(k) for k in m.runs}
    table: dict[Key, Stats] = {}
    for (mode, c, target), rounds in per_round.items():
        row: Stats = {name: median([s[name] for s in rounds]) for name in rounds[0]}
        direct = per_round[(mode, c, DIRECT)]
        pairs = list(zip(rounds, direct, strict=True))
        row["added_p50_ms"] = median([diff_ms(a["p50"], b["p50"]) for a, b in pairs])
        row["added_p99_ms"] = median([diff_ms(a["p99"], b["p99"]) for a, b in pairs])
        row["ttft_x"] = median([ratio(a["ttft_p50"], b["ttft_p50"]) for a, b in pairs])
        row["itl_x"] = median([ratio(a["itl_p50"], b["itl_p50"]) for a, b in pairs])
        row["failed"] = float(sum(r.requests - r.completed for r in m.runs[(mode, c, target)]))
        table[(mode, c, target)] = row
    return table


@dataclass
class Check:
    """One of the issue's targets: the measured value, its limit, and whether it holds."""

    what: str
    value: float | None
    limit: float
    at_most: bool  # True: value <= limit passes; False: value >= limit passes
    unit: str
    note: str = ""
    floor: float | None = None  # also fails below this (an ITL ratio far under 1: clumps)

    @property
    def mark(self) -> str:
        if self.value is None:
            return "SKIP"
        ok = self.value <= self.limit if self.at_most else self.value >= self.limit
        if self.floor is not None and self.value < self.floor:
            ok = False
        return "PASS" if ok else "FAIL"

    def line(self) -> str:
        shown = "-" if self.value is None else f"{self.value:.3f}{self.unit}"
        bound = f"{'<=' if self.at_most else '>='} {self.limit:g}{self.unit}"
        if self.floor is not None:
            bound += f", >= {self.floor:g}{self.unit}"
        note = f"  ({self.note})" if self.note else ""
        return f"[{self.mark}] {self.what}: {shown} ({bound}){note}"


def paired(m: Measured, mode: str, c: int, a: str, b: str, stat: str) -> float | None:
    """Median over rounds of stat(a) / stat(b), runs of the same round paired."""
    if (mode, c, a) not in m.runs or (mode, c, b) not in m.runs:
        return None
    pairs = zip(m.stats((mode, c, a)), m.stats((mode, c, b)), strict=True)
    return median([ratio(x[stat], y[stat]) for x, y in pairs])


def checks(m: Measured, table: dict[Key, Stats], judge: str = "all") -> list[Check]:
    """The issue's four targets, for every audit store measured (at c=1 and the highest level,
    64 by default). ``judge``: ``latency`` (the first three), ``throughput`` (requests/s
    against LiteLLM: meaningful only where the gateways, not the upstream, are the limit) or
    ``all``."""
    low, high = min(m.levels), max(m.levels)
    out: list[Check] = []
    for store in AUDIT_STORES:
        on = audited(store)
        if judge == "throughput":
            out.extend(_throughput(m, table, store, on, high))
            continue
        row = table.get(("non-stream", low, on), {})
        what = f"added p50, c={low}, non-stream, audit {store}"
        out.append(Check(what, row.get("added_p50_ms"), 1.0, True, " ms"))
        row = table.get(("stream", high, on), {})
        what = f"TTFT p50 through/direct, c={high}, stream, audit {store}"
        out.append(Check(what, row.get("ttft_x"), 1.05, True, "x"))
        # Tokens relayed in clumps (a gateway that buffers, or falls behind and then writes
        # what piled up) show as gaps far below the upstream's: that fails too.
        what = f"ITL p50 through/direct, c={high}, stream, audit {store}"
        note = "below 0.95: tokens arrive in clumps"
        out.append(Check(what, row.get("itl_x"), 1.05, True, "x", note, floor=0.95))
        for mode in MODES:
            what = f"p50 audit {store} / audit off, c={high}, {mode}"
            out.append(Check(what, paired(m, mode, high, on, AUDIT_OFF, "p50"), 1.05, True, "x"))
        if judge == "all":
            out.extend(_throughput(m, table, store, on, high))
    return out


def _throughput(
    m: Measured, table: dict[Key, Stats], store: str, on: str, high: int
) -> list[Check]:
    out: list[Check] = []
    for mode in MODES:
        value = paired(m, mode, high, on, LITELLM, "rps")
        cpu = paired(m, mode, high, LITELLM, on, "cpu_ms_per_req")
        direct = table.get((mode, high, DIRECT), {}).get("rps")
        note = m.litellm if value is None else f"LiteLLM CPU/request x{cpu or 0:.2f} of medserve's"
        if value is not None and direct:
            note += f"; direct {direct:.0f} req/s caps every gateway"
        what = f"req/s audit {store} / LiteLLM, c={high}, {mode}"
        out.append(Check(what, value, 3.0, False, "x", note))
    return out


def fmt(v: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if v is None else f"{v * scale:.{digits}f}"


def report(args: argparse.Namespace, m: Measured, table: dict[Key, Stats]) -> None:
    print(
        f"fake vLLM upstream: TTFT {args.ttft_ms:g} ms, {args.token_delay_ms:g} ms/token, "
        f"{args.tokens} tokens/request, chat; medians of {args.rounds} rounds; "
        f"{os.cpu_count()} CPUs; LiteLLM: {m.litellm}"
    )
    if m.server_cpus is None:
        print("CPU affinity: none (--no-pin or a single CPU)")
    else:
        print("CPU affinity: " + ", ".join(f"{k} {v}" for k, v in m.affinity.items()))
    head = (
        f"{'mode':<10} {'c':>3} {'target':<16} {'p50 ms':>8} {'p99 ms':>8} {'+p50':>7} "
        f"{'+p99':>7} {'TTFT':>7} {'xTTFT':>6} {'ITL':>6} {'xITL':>6} {'req/s':>7} "
        f"{'CPU ms/req':>10} {'gw busy':>7} {'others':>6} {'client':>6} {'fail':>4}"
    )
    print(head)
    for mode in MODES:
        for c in m.levels:
            for target in m.targets:
                v = table[(mode, c, target)]
                busy = v["client_busy"] or 0.0
                flag = "!" if busy > BUSY_FLAG else " "
                print(
                    f"{mode:<10} {c:>3} {target:<16} {fmt(v['p50'], 1000):>8} "
                    f"{fmt(v['p99'], 1000):>8} {fmt(v['added_p50_ms']):>7} "
                    f"{fmt(v['added_p99_ms']):>7} {fmt(v['ttft_p50'], 1000):>7} "
                    f"{fmt(v['ttft_x'], 1, 3):>6} {fmt(v['itl_p50'], 1000):>6} "
                    f"{fmt(v['itl_x'], 1, 3):>6} {fmt(v['rps'], 1, 1):>7} "
                    f"{fmt(v['cpu_ms_per_req'], 1, 3):>10} {fmt(v['server_busy'], 100, 0):>6}% "
                    f"{fmt(v['others'], 100, 0):>5}% "
                    f"{fmt(busy, 100, 0):>5}%{flag}{int(v['failed'] or 0):>4}"
                )
    print(
        "+p50/+p99: ms added vs direct in the same round; xTTFT/xITL: p50 through / direct; "
        "CPU ms/req: the server's process tree; gw busy / client: CPU use of their cores "
        f"(! above {BUSY_FLAG:.0%}: the client side was the limit of that run); others: "
        "the gateway's cores taken by any other process (other jobs, the idle gateways)"
    )
    print("Targets (issue 17):")
    for check in checks(m, table, args.judge):
        print("  " + check.line())
    failed = {k: r.errors for k, rs in m.runs.items() for r in rs if r.errors}
    if failed:
        print(f"failed requests: {failed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--levels", default="1,64", help="comma-separated concurrencies")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-user", type=int, default=4, help="requests per concurrent user")
    parser.add_argument("--min-requests", type=int, default=16, help="fewest requests per run")
    parser.add_argument("--tokens", type=int, default=16, help="max_tokens of every request")
    parser.add_argument("--token-delay-ms", type=float, default=40.0)
    parser.add_argument("--ttft-ms", type=float, default=20.0)
    parser.add_argument(
        "--prime", type=int, default=1, help="unmeasured waves of c requests before each run"
    )
    parser.add_argument("--no-litellm", action="store_true", help="leave LiteLLM's proxy out")
    parser.add_argument("--no-pin", action="store_true", help="no CPU affinity at all")
    parser.add_argument("--server-cpus", help="CPUs of every gateway, e.g. 1 (default: the last)")
    parser.add_argument("--client-cpus", help="CPUs of load generator + upstream (default: rest)")
    parser.add_argument(
        "--judge",
        choices=("all", "latency", "throughput"),
        default="all",
        help="which targets to mark: the latency ones need the default shape, the requests/s "
        "one a shape where the gateways are the limit (make bench-gateway runs both)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as t:
        m = measure(args, Path(t))
    table = summarize(m)
    if args.json:
        rows = [{"mode": k[0], "c": k[1], "target": k[2], **v} for k, v in table.items()]
        out: dict[str, Any] = {
            "args": vars(args),
            "litellm": m.litellm,
            "litellm_env": LITELLM_ENV,
            "affinity": m.affinity,
            "rows": rows,
            "targets": [{**vars(c), "mark": c.mark} for c in checks(m, table, args.judge)],
        }
        print(json.dumps(out, indent=2))
        return
    report(args, m, table)
    print(f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
