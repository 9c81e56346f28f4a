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

    PYTHONPATH=.:.pgdeps .venv/bin/python tests/bench/limits.py [--n 2000] [--json]
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

from medserve.auth.keys import Key, KeyStore
from medserve.auth.pgkeys import PgKeyStore
from medserve.auth.pglimits import SharedRateLimiter
from tests import pg

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with pg.running(fsync=True) as server:
        db = server.database()
        url = db.owner_url
        results = lookups(url, args.n, args.keys)
        results.update(asyncio.run(admissions(url, args.n, args.concurrency)))
    if args.json:
        print(json.dumps(results))
    else:
        for name, value in results.items():
            print(f"{name:40} {value}")


if __name__ == "__main__":
    main()
