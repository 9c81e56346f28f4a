"""Every statement medserve runs on a request's path or a writer's path is bounded: a lock
held by someone else (a `SELECT ... FOR UPDATE` left open in psql, a `LOCK TABLE`, another
gateway's migration) fails the operation, saying so, within seconds; it never hangs.

Each case holds a lock in a session of its own, runs the operation in a thread, and waits
for its outcome at most BOUND_S; without the bounds the operation waits for as long as the
lock is held (here: until the test gives up), which is the fault a user saw (requests of a
rate-limited key hanging while the key's row was locked).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medserve import pgsql
from medserve.audit import pgstore
from medserve.audit.keys import ChainKeys
from medserve.audit.pgstore import PgStore, open_schema
from medserve.audit.record import EventFacts
from medserve.audit.writer import AuditWriteError
from medserve.auth.keys import KeyStoreError
from medserve.auth.pgkeys import PgKeyStore
from medserve.auth.pglimits import RETRY_AFTER_S, SharedRateLimiter
from medserve.errors import UnavailableError
from tests import pg

psycopg = pytest.importorskip("psycopg", reason="the postgres extra (psycopg) is not installed")

BOUND_S = 30.0  # generous: the bounds are a few seconds; without them, no end at all
KEYS = ChainKeys.from_secret(bytes(range(32)))
SIGNER = Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))


@dataclass(frozen=True)
class Held:
    """A lock held by another session (``lock``: SQL, formatted with ``key``, the id of a
    rate-limited key), and the operation that meets it with the error it must end in.
    ``operation(db, key id)`` prepares (before the lock is taken) and returns what then
    runs in a thread."""

    lock: str
    operation: Callable[[pg.PgDatabase, str], Callable[[], None]]
    error: type[BaseException]
    migrated: bool = True


def admit(db: pg.PgDatabase, key_id: str) -> Callable[[], None]:
    key = next(k for k in PgKeyStore(db.owner_url).all() if k.id == key_id)

    async def run() -> None:
        limiter = SharedRateLimiter(db.gateway_url)
        await limiter.open()
        try:
            try:
                await limiter.admit(key)
            except UnavailableError as exc:
                assert exc.status == 503 and exc.code == "rate_limit_unavailable"
                assert exc.retry_after == RETRY_AFTER_S
                raise
        finally:
            await limiter.close()

    return lambda: asyncio.run(run())


def flush(db: pg.PgDatabase, key_id: str) -> Callable[[], None]:
    key = next(k for k in PgKeyStore(db.owner_url).all() if k.id == key_id)

    async def run() -> None:
        limiter = SharedRateLimiter(db.gateway_url)
        await limiter.open()
        try:
            limiter.charge(key, 10)
            await limiter.flush()
        finally:
            await limiter._pool.close()  # close() would flush once more

    return lambda: asyncio.run(run())


def refresh(db: pg.PgDatabase, key_id: str) -> Callable[[], None]:
    store = PgKeyStore(db.gateway_url)
    store.refresh()  # connected, schema checked: the next refresh is the one that waits

    def run() -> None:
        try:
            store.refresh()
        finally:
            store.close()

    return run


def revoke(db: pg.PgDatabase, key_id: str) -> Callable[[], None]:
    return lambda: PgKeyStore(db.owner_url).revoke(key_id)  # type: ignore[return-value]


def audit_append(db: pg.PgDatabase, key_id: str) -> Callable[[], None]:
    store = PgStore(db.gateway_url, "gw-a", KEYS, SIGNER, lock_wait_s=1.0)
    store.open()

    def run() -> None:
        try:
            asyncio.run(store.append(EventFacts("probe")))
        finally:
            store.close()

    return run


def keys_migration(db: pg.PgDatabase, key_id: str) -> Callable[[], None]:
    return lambda: PgKeyStore(db.owner_url).all()  # type: ignore[return-value]


def audit_migration(db: pg.PgDatabase, key_id: str) -> Callable[[], None]:
    def run() -> None:
        with psycopg.connect(db.owner_url, autocommit=True) as conn:
            open_schema(conn, db.owner_url, gateway_role=pg.GATEWAY, auditor_role=pg.AUDITOR)

    return run


ROW = "SELECT * FROM auth_rate WHERE key_id = '{key}' FOR UPDATE"
CASES = {
    "admission, the key's rate row locked": Held(ROW, admit, UnavailableError),
    "token charge flush, the key's rate row locked": Held(ROW, flush, psycopg.Error),
    "keys refresh, the generation table locked": Held(
        "LOCK TABLE auth_generation IN ACCESS EXCLUSIVE MODE", refresh, KeyStoreError
    ),
    "keys revoke, the key's row locked": Held(
        "SELECT * FROM auth_keys WHERE id = '{key}' FOR UPDATE", revoke, KeyStoreError
    ),
    "audit batch, the records table locked": Held(
        "LOCK TABLE audit_records IN ACCESS EXCLUSIVE MODE", audit_append, AuditWriteError
    ),
    "keys migration, another migration running": Held(
        f"SELECT pg_advisory_xact_lock({pgsql.MIGRATE_LOCK})",
        keys_migration,
        KeyStoreError,
        migrated=False,
    ),
    "audit migration, another migration running": Held(
        f"SELECT pg_advisory_xact_lock({pgsql.MIGRATE_LOCK})",
        audit_migration,
        pgsql.DatabaseError,
        migrated=False,
    ),
}


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """The audit writer's and the migrations' lock bounds (10 s each, chosen for
    production) cut to 1 s, so the table runs in seconds; the rate limiter's (1 s) and the
    keys store's (2 s) are the production values."""
    monkeypatch.setattr(pgstore, "LOCK_TIMEOUT_S", 1.0)
    monkeypatch.setattr(pgsql, "MIGRATE_LOCK_TIMEOUT_S", 1.0)


@pytest.fixture
def blocker(pg_db: pg.PgDatabase) -> Iterator[Any]:
    conn = psycopg.connect(pg_db.superuser_url)
    try:
        yield conn
    finally:
        conn.rollback()
        conn.close()


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_a_held_lock_fails_the_operation_within_a_bound(
    pg_db: pg.PgDatabase, blocker: Any, case: Held, quick: None
) -> None:
    key_id = ""
    if case.migrated:
        audit_migration(pg_db, "")()
        owner = PgKeyStore(pg_db.owner_url)
        key, _ = owner.create("ward-app", rpm=100, tpm=1000)
        key_id = key.id
        admit(pg_db, key_id)()  # the key's rate row exists
    operation = case.operation(pg_db, key_id)
    blocker.execute(case.lock.format(key=key_id))  # held until the test ends
    with ThreadPoolExecutor(1) as pool:
        outcome = pool.submit(operation)
        try:
            with pytest.raises(case.error) as raised:
                outcome.result(timeout=BOUND_S)
        finally:
            blocker.rollback()  # a hung operation (the fault) gets its lock and ends
    assert pg_db.server.passwords[pg.GATEWAY] not in str(raised.value)
    if not case.migrated:
        assert "lock" in str(raised.value) and "another" in str(raised.value)
