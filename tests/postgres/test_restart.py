"""Every PostgreSQL connection medserve keeps across time survives a database restart
(``pg_ctl -m immediate stop`` + start: every backend killed, every connection cut, the
advisory locks and LISTENs gone): the audit writer, the shared rate limiter's pool, the
keys store's refresher and its LISTEN, and a whole gateway process on all of them.

These tests restart their server, so they use one of their own (module scope), never the
session's shared one."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medserve.audit import pgverify
from medserve.audit.keys import ChainKeys
from medserve.audit.pgstore import PgStore, open_schema
from medserve.audit.record import EventFacts, RequestFacts
from medserve.auth.keys import Key
from medserve.auth.pgkeys import PgKeyStore
from medserve.auth.pglimits import SharedRateLimiter
from medserve.errors import RateLimitError
from tests import pg
from tests.conftest import ROOT
from tests.serverproc import FAKE_MODEL, fake_registry, running_server

psycopg = pytest.importorskip("psycopg", reason="the postgres extra (psycopg) is not installed")

KEYS = ChainKeys.from_secret(b"r" * 32)
SIGNER = Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))
WAIT_S = 30.0  # bound on polling for a condition (design bounds are a second or two)


@pytest.fixture(scope="module")
def server() -> Iterator[pg.PgServer]:
    try:
        own = pg.server()
    except pg.PgUnavailable as exc:
        pytest.skip(str(exc))
    try:
        own.start()
        yield own
    finally:
        own.stop()


@pytest.fixture
def db(server: pg.PgServer) -> Iterator[pg.PgDatabase]:
    made = server.database()
    with psycopg.connect(made.owner_url, autocommit=True) as conn:
        open_schema(conn, made.owner_url, gateway_role=pg.GATEWAY, auditor_role=pg.AUDITOR)
    PgKeyStore(made.owner_url).all()  # the keys schema and the rate limit functions
    try:
        yield made
    finally:
        server.drop(made)


def until(condition: object, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what} within {WAIT_S} s"
        time.sleep(0.05)


# -- the audit writer ------------------------------------------------------------------


def facts(i: int) -> RequestFacts:
    return RequestFacts(
        request_id=f"req-{i}", method="POST", endpoint="/v1/chat/completions", status=200
    )


def checkpoints(db: pg.PgDatabase) -> list[int]:
    with psycopg.connect(db.auditor_url) as conn:
        rows = conn.execute("SELECT seq FROM audit_checkpoints ORDER BY seq").fetchall()
    return [int(r[0]) for r in rows]


def append_one(store: PgStore) -> list[int]:
    return [asyncio.run(store.append(facts(4)))]


def close_only(store: PgStore) -> list[int]:
    return []


@pytest.mark.parametrize(
    ("after_restart", "seqs"),
    [
        (append_one, [4]),  # the first record after the restart: written, not lost
        (close_only, []),  # a clean close: its final checkpoint written, not lost
    ],
)
def test_the_audit_writer_carries_on_across_a_restart(
    db: pg.PgDatabase, after_restart: object, seqs: list[int]
) -> None:
    store = PgStore(db.gateway_url, "gw-a", KEYS, SIGNER, lock_wait_s=1.0)
    store.open()
    try:
        for i in range(1, 4):
            assert asyncio.run(store.append(facts(i))) == i
        db.server.restart()
        assert after_restart(store) == seqs  # type: ignore[operator]
        assert store.available()
        assert store.stats.failed == 0
    finally:
        store.close()
    last = 3 + len(seqs)
    assert checkpoints(db)[-1] == last  # the final checkpoint, after the restart
    result = pgverify.verify(db.auditor_url, KEYS, SIGNER.public_key())
    assert result.ok and result.records == last, result


def test_an_event_after_a_restart_is_not_lost(db: pg.PgDatabase) -> None:
    """What SIGTERM writes (server.stop) goes through submit(), with an on_lost callback."""
    lost: list[str] = []
    store = PgStore(db.gateway_url, "gw-a", KEYS, SIGNER, lock_wait_s=1.0)
    store.open()
    try:
        asyncio.run(store.append(facts(1)))
        db.server.restart()
        store.submit(EventFacts(event="server.stop"), on_lost=lambda: lost.append("stop"))
    finally:
        store.close()
    assert lost == []
    assert store.stats.written == 2 and checkpoints(db)[-1] == 2


def test_a_reopen_ends_the_writer_s_own_half_dead_connection(db: pg.PgDatabase) -> None:
    """After a network fault the server may keep the writer's dropped connection (and so
    its instance lock) for hours: the reopen terminates that session, and only that one,
    rather than refuse to write as if another gateway held the instance."""
    store = PgStore(db.gateway_url, "gw-a", KEYS, SIGNER, lock_wait_s=1.0)
    store.open()
    stranded = store._conn  # as the server sees a connection whose network went away
    try:
        asyncio.run(store.append(facts(1)))
        store._conn = None  # the writer has given it up (as _drop does), the server has not
        assert asyncio.run(store.append(facts(2))) == 2
        assert stranded is not None
        with pytest.raises(psycopg.OperationalError):
            stranded.execute("SELECT 1")
    finally:
        store.close()


# -- the shared rate limiter ------------------------------------------------------------


async def full_pool(limiter: SharedRateLimiter) -> None:
    """Every pooled connection made (as under load), so every one is dead after a restart."""
    gate = asyncio.Event()

    async def hold() -> None:
        async with limiter._pool.connection():
            await gate.wait()

    held = [asyncio.create_task(hold()) for _ in range(limiter.pool_size)]
    deadline = time.monotonic() + WAIT_S
    while limiter._pool.get_stats().get("pool_size", 0) < limiter.pool_size:
        assert time.monotonic() < deadline, "the pool did not fill"
        await asyncio.sleep(0.01)
    gate.set()
    await asyncio.gather(*held)


async def admit_four(limiter: SharedRateLimiter, key: Key) -> None:
    for _ in range(limiter.pool_size):  # one per dead pooled connection, as the user saw
        await limiter.admit(key)


async def charge_and_flush(limiter: SharedRateLimiter, key: Key) -> None:
    limiter.charge(key, 5)
    await limiter.flush()


@pytest.mark.parametrize("after_restart", [admit_four, charge_and_flush])
def test_the_rate_limiter_carries_on_across_a_restart(
    db: pg.PgDatabase, after_restart: object
) -> None:
    key, _ = PgKeyStore(db.owner_url).create("ward-app", rpm=1000, tpm=100000)

    async def run() -> None:
        limiter = SharedRateLimiter(db.gateway_url)
        await limiter.open()
        try:
            await full_pool(limiter)
            await limiter.admit(key)
            await asyncio.to_thread(db.server.restart)
            await after_restart(limiter, key)  # type: ignore[operator]
            await limiter.admit(key)
        finally:
            await limiter.close()

    asyncio.run(run())


def test_a_restart_refills_the_buckets_but_the_limit_holds(db: pg.PgDatabase) -> None:
    key, _ = PgKeyStore(db.owner_url).create("ward-app", rpm=2)

    async def run() -> None:
        limiter = SharedRateLimiter(db.gateway_url)
        await limiter.open()
        try:
            await asyncio.to_thread(db.server.restart)
            await limiter.admit(key)
            await limiter.admit(key)
            with pytest.raises(RateLimitError):
                await limiter.admit(key)
        finally:
            await limiter.close()

    asyncio.run(run())


# -- the keys store ---------------------------------------------------------------------


def test_the_keys_refresh_carries_on_across_a_restart(db: pg.PgDatabase) -> None:
    store = PgKeyStore(db.gateway_url)
    try:
        store.refresh()
        db.server.restart()
        store.refresh()  # the kept connection is dead: a new one, no error, no aged copy
        assert store.age() is not None and store.age() < store.stale_after_s  # type: ignore[operator]
    finally:
        store.close()


def test_the_keys_listen_comes_back_after_a_restart(db: pg.PgDatabase) -> None:
    """A revocation made after the restart reaches a gateway that was watching before it,
    and its LISTEN connection is back (so the change comes in milliseconds, not by polling
    alone)."""
    owner = PgKeyStore(db.owner_url)
    key, _ = owner.create("ward-app")
    watcher = PgKeyStore(db.gateway_url, refresh_s=0.2)

    async def run() -> None:
        task = asyncio.create_task(watcher.watch())
        try:
            await wait_for(lambda: watcher.listening and watcher.lookup(key.id) is not None)
            before = set(listening_backends(db))
            assert before
            await asyncio.to_thread(db.server.restart)
            # A new LISTEN session (the old one died with the server).
            await wait_for(lambda: bool(set(listening_backends(db)) - before))
            await asyncio.to_thread(owner.revoke, key.id)
            await wait_for(lambda: _revoked(watcher, key.id))
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            watcher.close()

    asyncio.run(run())


def _revoked(store: PgKeyStore, key_id: str) -> bool:
    found = store.lookup(key_id)
    return found is not None and found[0].revoked is not None


def listening_backends(db: pg.PgDatabase) -> list[int]:
    try:
        with psycopg.connect(db.superuser_url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND query ILIKE 'LISTEN%%'",
                (db.name,),
            ).fetchall()
    except psycopg.OperationalError:
        return []
    return [int(r[0]) for r in rows]


async def wait_for(condition: object) -> None:
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            if await asyncio.to_thread(condition):  # type: ignore[arg-type]
                return
        except Exception:  # a lookup refusing (503) while the copy is stale
            pass
        assert time.monotonic() < deadline, f"not within {WAIT_S} s"
        await asyncio.sleep(0.05)


# -- a gateway process on all of them ---------------------------------------------------


def test_a_gateway_serves_and_audits_across_a_restart_and_stops_cleanly(
    tmp_path: Path, db: pg.PgDatabase
) -> None:
    _, token = PgKeyStore(db.owner_url).create("ward-app", "user", [FAKE_MODEL], rpm=600)
    registry = fake_registry(tmp_path / "fake.toml", context_length=512)
    env = {
        "MEDSERVE_AUDIT__URL": db.gateway_url,
        "MEDSERVE_AUTH__URL": db.gateway_url,
        "MEDSERVE_INSTANCE": "gw-a",
    }
    headers = {"Authorization": f"Bearer {token}"}
    body = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with running_server(tmp_path / "serve.log", "-c", str(registry), env=env) as gw:
        with httpx.Client(base_url=gw.url, headers=headers, timeout=60) as http:
            with ThreadPoolExecutor(4) as pool:  # the limiter's pool grown, as under load
                codes = list(
                    pool.map(lambda _: http.post("/v1/chat/completions", json=body), range(8))
                )
            assert [r.status_code for r in codes] == [200] * 8
            db.server.restart()
            until(lambda: http.get("/ready").status_code == 200, "ready again")
            first = [http.post("/v1/chat/completions", json=body) for _ in range(4)]
            assert [r.status_code for r in first] == [200] * 4, [r.text for r in first]
        gw.process.send_signal(signal.SIGTERM)
        gw.process.wait(timeout=60)  # a graceful stop (uvicorn re-raises the signal)
    log = (tmp_path / "serve.log").read_text()
    assert "audit record lost" not in log and "audit write failed" not in log, log
    with psycopg.connect(db.auditor_url) as conn:
        rows = conn.execute(
            "SELECT seq, convert_from(body, 'UTF8')::json FROM audit_records ORDER BY seq"
        ).fetchall()
        final = conn.execute("SELECT max(seq) FROM audit_checkpoints").fetchone()
    ids = {r[1].get("request_id") for r in rows}
    assert {r.headers["x-request-id"] for r in first} <= ids
    assert rows[-1][1].get("event") == "server.stop"
    assert final == (rows[-1][0],)  # the shutdown checkpoint covers the last record
    done = subprocess.run(
        [sys.executable, "-m", "medserve", "audit", "verify", "--db", db.auditor_url]
        + ["--key", str(tmp_path / "audit" / "audit.key"), "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["records"] == len(rows)


# -- `medserve audit tail --follow` -------------------------------------------------------


def test_audit_tail_follow_carries_on_across_a_restart(db: pg.PgDatabase) -> None:
    import queue
    import threading

    store = PgStore(db.gateway_url, "gw-a", KEYS, SIGNER, lock_wait_s=1.0)
    store.open()
    asyncio.run(store.append(facts(1)))  # printed as the last line when tail starts
    cmd = [sys.executable, "-m", "medserve", "audit", "tail", "-f", "-n", "1"]
    tail = subprocess.Popen(
        [*cmd, "--db", db.auditor_url],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    out = tail.stdout
    assert out is not None

    def read() -> None:
        for line in out:
            lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def printed(request_id: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while True:
            left = deadline - time.monotonic()
            assert left > 0 and tail.poll() is None, f"{request_id} not printed"
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                continue
            if json.loads(line).get("request_id") == request_id:
                return

    try:
        printed("req-1")
        db.server.restart()
        asyncio.run(store.append(facts(2)))  # the writer carries on (tested above)
        printed("req-2")
        assert tail.poll() is None
    finally:
        tail.terminate()
        tail.wait(timeout=30)
        reader.join(timeout=30)
        out.close()
        store.close()
