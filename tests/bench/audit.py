"""What the audit log costs: durable records/s of the store, and request latency with/without.

1. Store alone: ``--records`` records appended by ``--concurrency`` coroutines (group
   commit) and, for contrast, by one at a time (one fsync per record); durable records/s,
   median of ``--rounds`` runs.
2. Server: two `medserve serve` processes, one with the audit log and one without, loaded
   in alternating rounds (fake engine: 64 concurrent requests; ``--engine llamacpp``: the
   packaged SmolLM2, 8 concurrent); p50 and p90 end-to-end latency and requests/s,
   medians over rounds, ratios audit/no-audit, and the server's CPU time per request
   (user + system, from /proc), which a load generator sharing the CPU cannot blur.

Targets (issue 4): >= 2,000 durable records/s; <= 5% p50 cost.

    .venv/bin/python tests/bench/audit.py [--rounds 5] [--engine fake|llamacpp] [--json]
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from medserve import bench
from medserve.audit import RequestFacts, open_store
from medserve.config import AuditSettings
from tests.conftest import DEV_KEY
from tests.serverproc import Server, fake_registry, running_server

# engine -> (model, concurrency, max_tokens)
LOADS = {"fake": ("fake-echo", 64, 16), "llamacpp": ("smollm2-135m-instruct", 8, 64)}


def facts(i: int) -> RequestFacts:
    return RequestFacts(
        request_id=f"{i:032x}",
        method="POST",
        endpoint="/v1/chat/completions",
        status=200,
        client="127.0.0.1",
        model="fake-echo",
        engine="fake",
        replica="fake:0",
        instance="bench",
        stream=False,
        prompt_tokens=120,
        completion_tokens=64,
        latency_ms=812.4,
        finish_reason="stop",
        prompt_hmac="ab" * 32,
        completion_hmac="cd" * 32,
    )


def store_rate(directory: Path, records: int, concurrency: int) -> float:
    """Durable records/s with ``concurrency`` writers waiting on their own record."""
    store = open_store(AuditSettings(path=directory / "audit.db"))

    async def writer(start: int, count: int) -> None:
        for i in range(start, start + count):
            await store.append(facts(i))

    async def run() -> float:
        per = records // concurrency
        begin = time.perf_counter()
        await asyncio.gather(*(writer(k * per, per) for k in range(concurrency)))
        return per * concurrency / (time.perf_counter() - begin)

    try:
        return asyncio.run(run())
    finally:
        store.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_latency(server: Server, requests: int, engine: str) -> dict[str, float]:
    model, concurrency, max_tokens = LOADS[engine]
    before = cpu_seconds(server.process.pid)
    report = asyncio.run(
        bench.run(
            server.url,
            model,
            concurrency=concurrency,
            requests=requests,
            max_tokens=max_tokens,
            prompts=bench.load_prompts(None),
            request_timeout_s=300,
            api_key=DEV_KEY,
        )
    )
    cpu = cpu_seconds(server.process.pid) - before
    # A rare transport error (about 1 in 10,000 here) is counted and reported, not fatal.
    assert report.completed >= 0.99 * requests, report.errors
    failed = requests - report.completed
    lat = report.latency_s
    return {
        "p50": lat["p50"],
        "p90": lat["p90"],
        "rps": report.requests_per_s,
        "cpu_ms_per_request": cpu * 1000 / requests,
        "failed": failed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--requests", type=int, default=2_000)
    parser.add_argument("--engine", choices=sorted(LOADS), default="fake")
    parser.add_argument(
        "--token-delay",
        type=float,
        default=0.0,
        help="Fake engine: seconds per token (0: a free engine, the audit's worst case).",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    requests = args.requests if args.engine == "fake" else 32

    rates: dict[str, list[float]] = {"concurrent_64": [], "one_at_a_time": []}
    with tempfile.TemporaryDirectory() as tmp:
        config = fake_registry(
            Path(tmp, "fake.toml"),
            context_length=512,
            max_queue=256,
            fake_token_delay_s=args.token_delay,
        )
        lat: dict[str, list[dict[str, float]]] = {"audit": [], "no_audit": []}
        on = {"MEDSERVE_AUDIT__PATH": str(Path(tmp, "server", "audit.db"))}
        off = {"MEDSERVE_AUDIT__ENABLED": "false"}
        flags = ["-c", str(config)] if args.engine == "fake" else []
        with (
            running_server(Path(tmp, "on.log"), *flags, env=on) as with_audit,
            running_server(Path(tmp, "off.log"), *flags, env=off) as without,
        ):
            server_latency(with_audit, 16, args.engine)  # warm both up
            server_latency(without, 16, args.engine)
            for _ in range(args.rounds):
                lat["audit"].append(server_latency(with_audit, requests, args.engine))
                lat["no_audit"].append(server_latency(without, requests, args.engine))
        # After the servers: the store runs leave the disk busy writing back for a while,
        # which would slow the audited server's fsyncs and not the other's.
        for r in range(args.rounds):
            rates["concurrent_64"].append(store_rate(Path(tmp, f"c{r}"), args.records, 64))
            rates["one_at_a_time"].append(store_rate(Path(tmp, f"s{r}"), args.records // 10, 1))

    result: dict[str, object] = {
        "store_records_per_s": {k: statistics.median(v) for k, v in rates.items()},
        "store_runs": rates,
        "latency_runs": lat,
    }
    for q in ("p50", "p90"):
        a = statistics.median(x[q] for x in lat["audit"])
        b = statistics.median(x[q] for x in lat["no_audit"])
        result[f"latency_{q}_ms"] = {"audit": a * 1000, "no_audit": b * 1000, "ratio": a / b}
    for key in ("rps", "cpu_ms_per_request"):
        a = statistics.median(x[key] for x in lat["audit"])
        b = statistics.median(x[key] for x in lat["no_audit"])
        result[key] = {"audit": a, "no_audit": b, "ratio": a / b}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    store = result["store_records_per_s"]
    assert isinstance(store, dict)
    print(f"store, 64 concurrent writers: {store['concurrent_64']:.0f} durable records/s")
    print(f"store, one writer:            {store['one_at_a_time']:.0f} durable records/s")
    for q in ("p50", "p90"):
        x = result[f"latency_{q}_ms"]
        assert isinstance(x, dict)
        print(
            f"latency {q}: audit {x['audit']:.1f} ms, "
            f"no audit {x['no_audit']:.1f} ms, ratio {x['ratio']:.3f}"
        )
    failures = {k: sum(int(r["failed"]) for r in v) for k, v in lat.items()}
    print(f"failed requests (transport errors): {failures}")
    for key in ("rps", "cpu_ms_per_request"):
        x = result[key]
        assert isinstance(x, dict)
        print(
            f"{key}: audit {x['audit']:.3f}, no audit {x['no_audit']:.3f}, ratio {x['ratio']:.3f}"
        )


if __name__ == "__main__":
    main()
