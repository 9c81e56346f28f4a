"""Rate limits shared by every gateway on one PostgreSQL database.

The same rule as :class:`medserve.auth.RateLimiter` (token buckets per key: a request is
admitted when one request and one token are left; its tokens are charged when it ends),
but each key's two buckets are one row of ``auth_rate`` that every gateway updates:

- **Admission** is one statement, ``SELECT * FROM auth_rate_admit(key, rpm, tpm)``, a
  function that locks the key's row, refills both buckets from the database's own clock
  (one clock for all gateways) and takes one request or answers how long to wait. Only
  keys with ``rpm`` or ``tpm`` reach the database; a key without limits costs nothing.
- The buckets are an unlogged table and the limiter's sessions commit without waiting
  for a WAL flush: an admission costs one round trip and a row lock, never an fsync. A
  database crash refills every bucket.
- **Charging** a finished request's tokens is queued and flushed every ``flush_s``
  (0.25 s by default) in one statement for all keys, off the request's path.

Tolerance: requests per minute are exact across any number of gateways (one row, locked,
is the only bucket: N gateways together admit what one would). Tokens per minute can go
over as they do on one gateway (a request is admitted with one token left, then charged
its whole answer), plus what finished in the last ``flush_s`` on each gateway and is not
charged yet. When the database cannot be asked, a limited key gets 503
``rate_limit_unavailable`` with Retry-After (fail closed), never an unlimited pass.

Bounds and faults: every statement of the limiter's sessions waits at most
:data:`LOCK_TIMEOUT_S` for a row lock and runs at most :data:`STATEMENT_TIMEOUT_S` (a key's
row held by someone else answers 503 within about a second, never a hang), and a pooled
connection that turns out dead (a database restart, an idle cut) is replaced and the
admission or the flush tried once more on a new one, so a restart costs no 503 for a
database that is back.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from medserve import pgsql
from medserve.auth.keys import Key
from medserve.errors import RateLimitError, UnavailableError

log = logging.getLogger(__name__)

FLUSH_S = 0.25
POOL_SIZE = 4
RETRY_AFTER_S = 2
# An admission holds its key's row for one statement of microseconds: waiting a second for
# it means someone else holds the row (a `SELECT ... FOR UPDATE` left open), and the request
# gets its 503 then. A statement (one admission, one flush of every key's charges) that runs
# as long as the Retry-After it would answer is treated as a database that cannot be asked.
LOCK_TIMEOUT_S = 1.0
STATEMENT_TIMEOUT_S = float(RETRY_AFTER_S)
# Part of the keys schema's first migration (medserve.auth.pgkeys.MIGRATIONS).
FUNCTIONS = """
CREATE FUNCTION auth_rate_level(level double precision, cap double precision,
                                since timestamptz, t timestamptz)
RETURNS double precision LANGUAGE sql IMMUTABLE AS $$
    SELECT least(cap, level + greatest(0, extract(epoch FROM t - since)) * cap / 60)
$$;
CREATE FUNCTION auth_rate_admit(k text, rpm double precision, tpm double precision,
                                OUT admitted boolean, OUT retry_after double precision,
                                OUT kind text)
LANGUAGE plpgsql AS $$
DECLARE
    r auth_rate%ROWTYPE;
    t timestamptz;
    req double precision;
    tok double precision;
BEGIN
    INSERT INTO auth_rate VALUES (k, coalesce(rpm, 0), coalesce(tpm, 0), clock_timestamp())
        ON CONFLICT (key_id) DO NOTHING;
    SELECT * INTO r FROM auth_rate WHERE key_id = k FOR UPDATE;
    t := clock_timestamp();  -- after the lock: a wait for it refills, never drains
    req := CASE WHEN rpm IS NULL THEN NULL ELSE auth_rate_level(r.requests, rpm, r.updated, t) END;
    tok := CASE WHEN tpm IS NULL THEN NULL ELSE auth_rate_level(r.tokens, tpm, r.updated, t) END;
    admitted := coalesce(req >= 1, true) AND coalesce(tok >= 1, true);
    retry_after := greatest(CASE WHEN req < 1 THEN (1 - req) * 60 / rpm ELSE 0 END,
                            CASE WHEN tok < 1 THEN (1 - tok) * 60 / tpm ELSE 0 END);
    kind := CASE WHEN tok < 1 THEN 'tokens' WHEN req < 1 THEN 'requests' END;
    UPDATE auth_rate SET requests = coalesce(req, 0) - CASE WHEN admitted THEN 1 ELSE 0 END,
                         tokens = coalesce(tok, 0), updated = t
        WHERE key_id = k;
END $$;
CREATE FUNCTION auth_rate_charge(k text, rpm double precision, tpm double precision,
                                 n double precision)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    r auth_rate%ROWTYPE;
    t timestamptz;
BEGIN
    SELECT * INTO r FROM auth_rate WHERE key_id = k FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    t := clock_timestamp();
    UPDATE auth_rate SET
        requests = CASE WHEN rpm IS NULL THEN 0
                        ELSE auth_rate_level(r.requests, rpm, r.updated, t) END,
        tokens = CASE WHEN tpm IS NULL THEN 0
                      ELSE auth_rate_level(r.tokens, tpm, r.updated, t) - n END,
        updated = t
        WHERE key_id = k;
END $$;
"""
ADMIT = "SELECT admitted, retry_after, kind FROM auth_rate_admit(%s, %s, %s)"
CHARGE = (
    "SELECT auth_rate_charge(k, r, t, n) FROM "
    "unnest(%s::text[], %s::float8[], %s::float8[], %s::float8[]) AS c(k, r, t, n)"
)


async def _configure(conn: Any) -> None:
    """A bucket update needs no durability (``auth_rate`` is unlogged): never wait for a
    WAL flush at commit. Every statement bounded (see the module docstring)."""
    await conn.execute("SET synchronous_commit = off")
    await conn.execute(pgsql.BOUNDS, pgsql.bounds(STATEMENT_TIMEOUT_S, LOCK_TIMEOUT_S))


class SharedRateLimiter:
    """Requests/min and tokens/min per key in PostgreSQL (see the module docstring).

    :meth:`open` before use (inside the event loop), :meth:`close` at the end.
    :meth:`admit` raises :class:`RateLimitError` (429) or, when the database cannot be
    asked, :class:`UnavailableError` (503). The schema must already be at the keys
    schema's version (:class:`medserve.auth.pgkeys.PgKeyStore` migrates it).
    """

    def __init__(self, url: str, flush_s: float = FLUSH_S, pool_size: int = POOL_SIZE) -> None:
        self.url = url
        self.flush_s = flush_s
        self.pool_size = pool_size
        self._pool: Any = None
        self._pending: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
        self._flusher: asyncio.Task[None] | None = None
        # Called with each admission's round trip (s), and on each 503 (metrics).
        self.on_check: Callable[[float], None] | None = None
        self.on_unavailable: Callable[[], None] | None = None

    async def open(self) -> None:
        from psycopg_pool import AsyncConnectionPool

        self._pool = AsyncConnectionPool(
            self.url,
            min_size=1,
            max_size=self.pool_size,
            kwargs={"autocommit": True, "connect_timeout": pgsql.CONNECT_TIMEOUT_S},
            open=False,
            timeout=RETRY_AFTER_S,
            configure=_configure,
        )
        await self._pool.open()
        self._flusher = asyncio.create_task(self._flush_forever())

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        if self._pool is not None:
            try:
                await self.flush()
            finally:
                await self._pool.close()
                self._pool = None

    async def admit(self, key: Key) -> None:
        """Take one request from ``key``'s shared buckets, or raise 429/503."""
        if not key.rpm and not key.tpm:
            return
        import psycopg
        from psycopg_pool import PoolTimeout

        started = time.perf_counter()
        try:
            row = await self._execute(ADMIT, (key.id, key.rpm or None, key.tpm or None))
        except (psycopg.Error, PoolTimeout) as exc:
            log.warning("shared rate limit not checked", extra={"error": type(exc).__name__})
            if self.on_unavailable is not None:
                self.on_unavailable()
            raise UnavailableError(
                "Rate limits cannot be checked right now; retry shortly.",
                code="rate_limit_unavailable",
                retry_after=RETRY_AFTER_S,
            ) from None
        if self.on_check is not None:
            self.on_check(time.perf_counter() - started)
        admitted, retry_after, kind = row
        if not admitted:
            raise RateLimitError(
                f"Rate limit reached for this API key ({kind} per minute); retry later.",
                retry_after=max(1, math.ceil(retry_after)),
            )

    def charge(self, key: Key, tokens: int) -> None:
        """Queue ``tokens`` against ``key``'s token bucket (flushed every ``flush_s``)."""
        if key.tpm and tokens:
            entry = self._pending[key.id]
            entry[0], entry[1], entry[2] = float(key.rpm or 0), float(key.tpm), entry[2] + tokens

    async def flush(self) -> None:
        """Charge the queued tokens now, in one statement."""
        if not self._pending or self._pool is None:
            return
        pending, self._pending = self._pending, defaultdict(lambda: [0.0, 0.0, 0.0])
        ids = list(pending)
        rpm = [pending[k][0] or None for k in ids]
        tpm = [pending[k][1] for k in ids]
        used = [pending[k][2] for k in ids]
        await self._execute(CHARGE, (ids, rpm, tpm, used))

    async def _execute(self, query: str, args: tuple[Any, ...]) -> Any:
        """``query``'s first row on a pooled connection. A connection found dead (broken:
        the database restarted, or cut it while idle) is discarded with every other dead
        one in the pool (:meth:`AsyncConnectionPool.check`), and the query runs once more
        on a new connection; any other error, or a second failure, raises (psycopg.Error,
        PoolTimeout)."""
        import psycopg

        for attempt in range(2):
            broken = False
            try:
                async with self._pool.connection() as conn:
                    try:
                        cur = await conn.execute(query, args)
                        return await cur.fetchone() if cur.description else None
                    except psycopg.Error:
                        broken = conn.broken  # before the pool takes it back and drops it
                        raise
            except psycopg.Error as exc:
                if attempt or not broken:
                    raise
                log.warning(
                    "shared rate limit connection lost", extra={"error": type(exc).__name__}
                )
                await self._pool.check()
        return None  # not reached: the second attempt returns or raises

    async def _flush_forever(self) -> None:
        import psycopg
        from psycopg_pool import PoolTimeout

        while True:
            await asyncio.sleep(self.flush_s)
            try:
                await self.flush()
            except (psycopg.Error, PoolTimeout) as exc:
                # These charges are lost (the keys get that many tokens more); logged.
                log.warning("token charges not written", extra={"error": type(exc).__name__})
            except Exception:
                log.exception("token charge flush failed")
