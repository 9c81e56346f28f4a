"""What keys and rate limits in PostgreSQL cost per request (issue 19).

On the throwaway server of tests/pg.py (unix socket, ``fsync=on`` like production):

1. Key lookup, the per-request path: :meth:`PgKeyStore.lookup` (the in-memory copy) against
   the SQLite :meth:`KeyStore.lookup` (a query on a file), microseconds per call.
2. The refresher's cost: :meth:`PgKeyStore.refresh` when nothing changed (one one-row
   query), and when the key table changed (reload of ``--keys`` keys), milliseconds.
3. Shared admission, the one round trip a limited key's request makes:
   :meth:`SharedRateLimiter.admit` one at a time (p50/p99 microseconds), and with
   ``--concurrency`` coroutines spread over two limiters (two gateways) on one hot key and
   on one key each (admissions/s: a hot key's row lock serialises its admissions).

4. With ``--gateway``: two `medserve serve` processes (fake engine, audit off, so only the
   keys and limits differ), one with SQLite keys and per-process limits, one with keys and
   limits in PostgreSQL; a key with a limit never reached; ``--rounds`` alternating rounds
   of ``--requests`` at ``--concurrency``; medians of p50 latency and requests/s.

    PYTHONPATH=.:.pgdeps .venv/bin/python tests/bench/limits.py [--n 2000] [--gateway] [--json]

Measured 2026-11-30 on this 2-core machine while other test runs were going on (load ~3.5),
the server on the same cores: lookup 0.3-0.5 µs (copy) vs 11-19 µs (SQLite); refresh,
nothing changed, 0.2-0.6 ms; reload after a change with 1,000 keys 28-44 ms; admission p50
0.22-0.26 ms, p99 2.5-3.1 ms; 64 concurrent admissions over two limiters 3,300-3,700/s on
one key, 4,300-4,500/s on a key each. Gateways, 3 x 1,000 requests at 64 concurrency:
p50 98.6 ms (SQLite) vs 123.8 ms (PostgreSQL), 561 vs 479 requests/s: about 0.3 ms of
this machine's CPU per limited request (the database server's share included).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from medserve import bench
from medserve.auth.keys import Key, KeyStore
from medserve.auth.pgkeys import PgKeyStore
from medserve.auth.pglimits import SharedRateLimiter
from tests import pg
from tests.serverproc import fake_registry, running_server

BIG = 10**9  # a limit never reached: every admission does the full work


def per_call_us(call: object, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        call()  # type: ignore[operator]
    return (time.perf_counter() - start) / n * 1e6


def lookups(url: str, n: int, keys: int) -> dict[str, float]:
    store = PgKeyStore(url)
    made = [store.create(f"app-{i}")[0].id for i in range(keys)]
    store.refresh()
    with tempfile.TemporaryDirectory() as tmp:
        local = KeyStore(Path(tmp) / "keys.db")
        local_id = local.create("app")[0].id
        sqlite_us = per_call_us(lambda: local.lookup(local_id), n)
        local.close()
    copy_us = per_call_us(lambda: store.lookup(made[0]), n * 10)
    unchanged_ms = per_call_us(store.refresh, 200) / 1000
    start = time.perf_counter()
    PgKeyStore(url).create("one-more")
    store.refresh()
    reload_ms = (time.perf_counter() - start) * 1000
    store.close()
    return {
        "lookup_pg_copy_us": round(copy_us, 3),
        "lookup_sqlite_us": round(sqlite_us, 1),
        "refresh_unchanged_ms": round(unchanged_ms, 3),
        f"create_and_reload_{keys}_keys_ms": round(reload_ms, 1),
    }


async def admissions(url: str, n: int, concurrency: int) -> dict[str, float]:
    store = PgKeyStore(url)
    hot = store.create("hot", rpm=BIG, tpm=BIG)[0]
    many = [store.create(f"k{i}", rpm=BIG)[0] for i in range(concurrency)]
    a, b = SharedRateLimiter(url, pool_size=8), SharedRateLimiter(url, pool_size=8)
    await a.open()
    await b.open()
    try:
        for _ in range(50):  # warm: connections made, statements prepared
            await a.admit(hot)
        times = []
        for _ in range(n):
            start = time.perf_counter()
            await a.admit(hot)
            times.append((time.perf_counter() - start) * 1e6)
        times.sort()

        async def load(keys: list[Key]) -> float:
            per = n // concurrency
            start = time.perf_counter()

            async def worker(i: int) -> None:
                limiter = a if i % 2 else b
                for _ in range(per):
                    await limiter.admit(keys[i % len(keys)])

            await asyncio.gather(*(worker(i) for i in range(concurrency)))
            return per * concurrency / (time.perf_counter() - start)

        hot_rate = await load([hot])
        spread_rate = await load(many)
    finally:
        await a.close()
        await b.close()
    return {
        "admit_p50_us": round(statistics.median(times), 1),
        "admit_p99_us": round(times[int(len(times) * 0.99)], 1),
        f"admit_per_s_{concurrency}_on_one_key": round(hot_rate),
        f"admit_per_s_{concurrency}_on_own_keys": round(spread_rate),
    }


def gateways(url: str, rounds: int, requests: int, concurrency: int) -> dict[str, float]:
    """p50 latency (ms) and requests/s, medians over rounds: SQLite vs PostgreSQL keys."""
    from contextlib import ExitStack

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        root = Path(tmp)
        config = fake_registry(root / "fake.toml", context_length=512)
        _, sqlite_token = KeyStore(root / "keys.db").create("bench", rpm=BIG, tpm=BIG)
        _, pg_token = PgKeyStore(url).create("bench", rpm=BIG, tpm=BIG)
        common = {"MEDSERVE_AUDIT__ENABLED": "false"}
        setups = {
            "sqlite": ({**common, "MEDSERVE_AUTH__KEYS_PATH": str(root / "keys.db")}, sqlite_token),
            "postgresql": ({**common, "MEDSERVE_AUTH__URL": url}, pg_token),
        }
        servers = {}
        for name, (env, _) in setups.items():
            log = root / f"{name}.log"
            servers[name] = stack.enter_context(running_server(log, "-c", str(config), env=env))
        p50: dict[str, list[float]] = {name: [] for name in setups}
        rate: dict[str, list[float]] = {name: [] for name in setups}
        for _ in range(rounds):
            for name, (_, token) in setups.items():
                report = asyncio.run(
                    bench.run(
                        servers[name].url,
                        "fake-echo",
                        concurrency=concurrency,
                        requests=requests,
                        max_tokens=16,
                        prompts=["a question about dosing"],
                        api_key=token,
                        request_timeout_s=120,
                        time_limit_s=600,
                    )
                )
                assert report.completed == requests, report.errors
                p50[name].append(report.latency_s["p50"] * 1000)
                rate[name].append(report.requests_per_s)
    return {
        **{f"gateway_p50_ms_{n}": round(statistics.median(v), 2) for n, v in p50.items()},
        **{f"gateway_req_per_s_{n}": round(statistics.median(v)) for n, v in rate.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--gateway", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with pg.running(fsync=True) as server:
        db = server.database()
        url = db.owner_url
        results = lookups(url, args.n, args.keys)
        results.update(asyncio.run(admissions(url, args.n, args.concurrency)))
        if args.gateway:
            gateway_db = server.database()
            results.update(
                gateways(gateway_db.owner_url, args.rounds, args.requests, args.concurrency)
            )
    if args.json:
        print(json.dumps(results))
    else:
        for name, value in results.items():
            print(f"{name:40} {value}")


if __name__ == "__main__":
    main()
