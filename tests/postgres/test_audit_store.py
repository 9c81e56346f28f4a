"""The PostgreSQL audit store on a real PostgreSQL: writing, roles, schema, verification."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medserve.audit import export as exporting
from medserve.audit import pgverify
from medserve.audit.keys import ChainKeys, ContentCipher
from medserve.audit.pgstore import PgStore, open_schema
from medserve.audit.record import EventFacts, RequestFacts
from medserve.audit.store import AuditError, AuditWriteError
from medserve.audit.verify import Verification
from tests import pg

KEYS = ChainKeys.from_secret(bytes(range(32)))
SIGNER = Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))


def facts(i: int, instance: str = "gw-a") -> RequestFacts:
    return RequestFacts(
        request_id=f"req-{i}",
        method="POST",
        endpoint="/v1/chat/completions",
        status=200,
        instance=instance,
    )


def make(url: str, instance: str = "gw-a", **kw: object) -> PgStore:
    return PgStore(url, instance, KEYS, SIGNER, lock_wait_s=1.0, **kw)  # type: ignore[arg-type]


async def fill(store: PgStore, n: int, instance: str = "gw-a") -> list[int]:
    return list(await asyncio.gather(*(store.append(facts(i, instance)) for i in range(n))))


def write(url: str, n: int, instance: str = "gw-a", **kw: object) -> list[int]:
    store = make(url, instance, **kw)
    store.open()
    try:
        return asyncio.run(fill(store, n, instance))
    finally:
        store.close()


@pytest.fixture
def migrated(pg_db: pg.PgDatabase) -> pg.PgDatabase:
    """The database with the audit schema applied by its owner."""
    with psycopg.connect(pg_db.owner_url, autocommit=True) as conn:
        open_schema(conn, pg_db.owner_url, gateway_role=pg.GATEWAY, auditor_role=pg.AUDITOR)
    return pg_db


def check(url: str, external: list[dict[str, object]] | None = None) -> Verification:
    return pgverify.verify(url, KEYS, SIGNER.public_key(), external)


def test_concurrent_appends_are_committed_in_one_chain_that_verifies(
    migrated: pg.PgDatabase,
) -> None:
    seqs = write(migrated.gateway_url, 300, checkpoint_every=50)
    assert sorted(seqs) == list(range(1, 301))
    with psycopg.connect(migrated.auditor_url) as conn:
        count = conn.execute("SELECT count(*) FROM audit_records").fetchone()
    assert count == (300,)
    result = check(migrated.auditor_url)
    assert result.ok, result.problem
    assert result.records == 300 and result.checkpoints >= 1 and result.instances == 1


def test_a_reopened_store_continues_its_chain(migrated: pg.PgDatabase) -> None:
    write(migrated.gateway_url, 5)
    assert write(migrated.gateway_url, 3) == [6, 7, 8]
    assert check(migrated.auditor_url).records == 8


def test_the_owner_applies_the_migrations_and_a_gateway_role_cannot(pg_db: pg.PgDatabase) -> None:
    store = make(pg_db.gateway_url)
    with pytest.raises(AuditError, match="medserve audit migrate") as info:
        store.open()
    assert pg_db.server.passwords[pg.GATEWAY] not in str(info.value)
    write(pg_db.owner_url, 2, instance="gw-owner")
    assert write(pg_db.gateway_url, 2) == [1, 2]
    with psycopg.connect(pg_db.superuser_url) as conn:
        version = conn.execute(
            "SELECT version FROM schema_version WHERE component = 'audit'"
        ).fetchone()
    assert version == (1,)


def test_a_schema_newer_than_this_medserve_is_refused(migrated: pg.PgDatabase) -> None:
    with psycopg.connect(migrated.superuser_url, autocommit=True) as conn:
        conn.execute("UPDATE schema_version SET version = 99 WHERE component = 'audit'")
    for url in (migrated.owner_url, migrated.gateway_url):
        with pytest.raises(AuditError, match="version 99.*upgrade medserve"):
            make(url).open()


@dataclass(frozen=True)
class Forbidden:
    role: str
    statement: str


FORBIDDEN = [
    *(
        Forbidden(pg.GATEWAY, statement)
        for statement in (
            "UPDATE audit_records SET kind = 'x'",
            "DELETE FROM audit_records",
            "TRUNCATE audit_records",
            "UPDATE audit_checkpoints SET seq = 0",
            "DELETE FROM audit_checkpoints",
            "DELETE FROM audit_instances",
            "UPDATE audit_content SET sealed = ''",
            "DELETE FROM audit_content",
            "UPDATE schema_version SET version = 0",
            "DROP TABLE audit_records",
        )
    ),
    *(
        Forbidden(pg.AUDITOR, statement)
        for statement in (
            "INSERT INTO audit_instances VALUES ('x', 'y', 'z')",
            "DELETE FROM audit_records",
            "UPDATE audit_records SET kind = 'x'",
            "TRUNCATE audit_checkpoints",
        )
    ),
]


@pytest.mark.parametrize("case", FORBIDDEN, ids=lambda c: f"{c.role}:{c.statement[:24]}")
def test_the_roles_may_not_change_or_remove_records(
    migrated: pg.PgDatabase, case: Forbidden
) -> None:
    write(migrated.gateway_url, 3)
    with (
        psycopg.connect(migrated.url(case.role)) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute(case.statement.encode())


def test_two_writers_as_one_instance_are_refused(migrated: pg.PgDatabase) -> None:
    first = make(migrated.gateway_url)
    first.open()
    try:
        with pytest.raises(AuditError, match="another gateway is writing.*'gw-a'"):
            make(migrated.gateway_url).open()
    finally:
        first.close()
    write(migrated.gateway_url, 1)  # the lock went with the first store's connection


def test_the_password_never_reaches_an_error_or_a_repr(pg_db: pg.PgDatabase) -> None:
    password = pg_db.server.passwords[pg.GATEWAY]
    wrong = pg_db.gateway_url.replace(password, password[::-1])
    with pytest.raises(AuditError) as info:
        make(wrong).open()
    assert password[::-1] not in str(info.value) and "***" in str(info.value)
    assert password not in repr(make(pg_db.gateway_url))


# -- tampering, as a superuser ---------------------------------------------------------


def two_instances(url: str) -> None:
    """gw-a and gw-b write 20 records each, with checkpoints every 5 and on close. gw-b
    closes (its final checkpoint signed, its writer stopped) before gw-a writes its last
    10, so gw-a's later checkpoints name gw-b's head: a checkpoint's peers are what the
    database holds when it is signed, and gw-b's own checkpoint follows its records'
    commit on its writer thread (under load it came after gw-a's, which then named an
    older head of gw-b and left a truncation past it unseen)."""
    a, b = make(url, "gw-a", checkpoint_every=5), make(url, "gw-b", checkpoint_every=5)
    a.open()
    b.open()
    try:
        asyncio.run(fill(a, 10, "gw-a"))
        asyncio.run(fill(b, 20, "gw-b"))
        b.close()
        asyncio.run(fill(a, 10, "gw-a"))
    finally:
        b.close()
        a.close()


def swap(conn: psycopg.Connection, x: int, y: int) -> None:
    conn.execute("UPDATE audit_records SET seq = -1 WHERE instance = 'gw-b' AND seq = %s", (x,))
    conn.execute("UPDATE audit_records SET seq = %s WHERE instance = 'gw-b' AND seq = %s", (x, y))
    conn.execute("UPDATE audit_records SET seq = %s WHERE instance = 'gw-b' AND seq = -1", (y,))


@dataclass(frozen=True)
class Tamper:
    name: str
    act: Callable[[psycopg.Connection], object]
    kind: str
    seq: int
    instance: str = "gw-b"


TAMPERS = [
    Tamper(
        "altered body",
        lambda c: c.execute(
            "UPDATE audit_records SET body = "
            "convert_to(replace(convert_from(body, 'UTF8'), 'req-', 'REQ-'), 'UTF8') "
            "WHERE instance = 'gw-b' AND seq = 7"
        ),
        "altered",
        7,
    ),
    Tamper(
        "deleted row",
        lambda c: c.execute("DELETE FROM audit_records WHERE instance = 'gw-b' AND seq = 4"),
        "deleted",
        4,
    ),
    Tamper("reordered rows", lambda c: swap(c, 3, 9), "reordered", 3),
    Tamper(
        "truncated chain",
        lambda c: c.execute("DELETE FROM audit_records WHERE instance = 'gw-b' AND seq > 12"),
        "truncated",
        13,
    ),
    Tamper(
        "truncated with its own checkpoints",
        lambda c: (
            c.execute("DELETE FROM audit_records WHERE instance = 'gw-b' AND seq > 12"),
            c.execute("DELETE FROM audit_checkpoints WHERE instance = 'gw-b'"),
        ),
        "truncated",
        13,
    ),
    Tamper(
        "instance removed: records, checkpoints, registration",
        lambda c: [
            c.execute(f"DELETE FROM {t} WHERE instance = 'gw-b'")
            for t in ("audit_records", "audit_checkpoints", "audit_instances", "audit_content")
        ],
        "removed",
        1,
    ),
    Tamper(
        "rows moved to another instance",
        lambda c: c.execute("UPDATE audit_records SET instance = 'gw-c' WHERE instance = 'gw-b'"),
        "truncated",
        1,
    ),
]


@pytest.mark.parametrize("case", TAMPERS, ids=lambda c: c.name)
def test_verify_names_the_first_bad_record_and_the_damage(
    migrated: pg.PgDatabase, case: Tamper
) -> None:
    two_instances(migrated.gateway_url)
    assert check(migrated.auditor_url).ok
    with psycopg.connect(migrated.superuser_url, autocommit=True) as conn:
        case.act(conn)
    result = check(migrated.auditor_url)
    assert result.problem is not None, case.name
    got = (result.problem.instance, result.problem.kind, result.problem.seq)
    assert got == (case.instance, case.kind, case.seq), result.problem.detail


def test_events_and_requests_share_the_chain(migrated: pg.PgDatabase) -> None:
    store = make(migrated.gateway_url)
    store.open()
    try:

        async def both() -> None:
            await store.append(EventFacts("server.start", instance="gw-a"))
            await store.append(facts(1))

        asyncio.run(both())
    finally:
        store.close()
    with psycopg.connect(migrated.auditor_url) as conn:
        kinds = conn.execute("SELECT kind FROM audit_records ORDER BY seq").fetchall()
    assert kinds == [("event",), ("request",)]
    assert check(migrated.auditor_url).ok


def test_group_commit_puts_many_records_in_one_transaction(migrated: pg.PgDatabase) -> None:
    store = make(migrated.gateway_url)
    commits: list[float] = []
    store.on_commit = commits.append
    store.open()
    try:
        seqs = asyncio.run(fill(store, 500))
    finally:
        store.close()
    assert sorted(seqs) == list(range(1, 501))
    assert 1 <= len(commits) < 500 // 4  # appended all at once: a few large batches


def test_a_dropped_connection_fails_its_batch_and_the_store_recovers(
    migrated: pg.PgDatabase,
) -> None:
    store = make(migrated.gateway_url)
    store.open()
    try:
        assert asyncio.run(fill(store, 3)) == [1, 2, 3]
        with psycopg.connect(migrated.superuser_url, autocommit=True) as conn:
            killed = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE usename = %s AND datname = %s",
                (pg.GATEWAY, migrated.name),
            ).fetchone()
        assert killed == (1,)

        async def after() -> list[int | BaseException]:
            return list(await asyncio.gather(store.append(facts(9)), return_exceptions=True))

        first = asyncio.run(after())  # the dead connection's batch: lost, and said so
        assert isinstance(first[0], AuditWriteError) or first == [4]
        if isinstance(first[0], AuditWriteError):
            assert not store.available()
        assert asyncio.run(fill(store, 1)) == [4 if first != [4] else 5]
        assert store.available()
    finally:
        store.close()
    assert check(migrated.auditor_url).ok


def test_another_audit_secret_is_refused_at_start(migrated: pg.PgDatabase) -> None:
    write(migrated.gateway_url, 2)
    other = PgStore(
        migrated.gateway_url, "gw-z", ChainKeys.from_secret(bytes(32)), SIGNER, lock_wait_s=1.0
    )
    with pytest.raises(AuditError, match="audit secret does not match"):
        other.open()
    assert check(migrated.auditor_url).ok  # the refused gateway left nothing behind
    result = pgverify.verify(migrated.auditor_url, ChainKeys.from_secret(bytes(32)), None)
    assert result.problem is not None and result.problem.kind == "wrong_key"


def test_captured_content_is_kept_apart_and_exported_decrypted(migrated: pg.PgDatabase) -> None:
    cipher = ContentCipher(bytes(range(100, 132)))
    store = make(migrated.gateway_url)
    store.open()
    try:

        async def one() -> int:
            sealed = cipher.seal(b'{"prompt": "p", "completion": "c"}', "req-1")
            return await store.append(facts(1), sealed)

        assert asyncio.run(one()) == 1
    finally:
        store.close()
    with psycopg.connect(migrated.auditor_url) as conn:
        (item,) = exporting.pg_records(conn, cipher=cipher)
        (plain,) = exporting.pg_records(conn)
    assert item["content"] == {"prompt": "p", "completion": "c"}
    assert "content" not in plain and item["instance_chain"] == "gw-a"


def test_records_above_the_heads_are_exactly_the_new_ones(migrated: pg.PgDatabase) -> None:
    write(migrated.gateway_url, 3, "gw-a")
    write(migrated.gateway_url, 2, "gw-b")
    with psycopg.connect(migrated.auditor_url) as conn:
        heads = exporting.pg_heads(conn)
    assert heads == {"gw-a": 3, "gw-b": 2}
    write(migrated.gateway_url, 2, "gw-b")
    write(migrated.gateway_url, 1, "gw-c")
    with psycopg.connect(migrated.auditor_url) as conn:
        new = [(i["instance_chain"], i["seq"]) for i in exporting.pg_records(conn, above=heads)]
    assert sorted(new) == [("gw-b", 3), ("gw-b", 4), ("gw-c", 1)]


def test_an_idle_writer_signs_a_checkpoint_when_the_interval_ends(
    migrated: pg.PgDatabase,
) -> None:
    store = make(migrated.gateway_url, checkpoint_interval_s=0.2)
    store.open()
    try:
        asyncio.run(fill(store, 2))
        deadline = time.monotonic() + 30
        while store.stats.checkpoints == 0 and time.monotonic() < deadline:
            time.sleep(0.05)  # polling a condition, bounded
        assert store.stats.checkpoints >= 1
        with psycopg.connect(migrated.auditor_url) as conn:
            row = conn.execute("SELECT instance, seq FROM audit_checkpoints").fetchone()
        assert row == ("gw-a", 2)
    finally:
        store.close()


def test_a_chain_behind_its_checkpoint_file_refuses_to_continue(
    migrated: pg.PgDatabase, tmp_path: Path
) -> None:
    """A database restored from an older backup (here: the newest rows cut by a superuser)
    would let the instance reuse sequence numbers its kept checkpoints vouch for. Another
    instance's lines in the same file do not count against this one."""
    kept = tmp_path / "checkpoints.jsonl"
    write(migrated.gateway_url, 3, "gw-b", checkpoint_file=kept)
    write(migrated.gateway_url, 6, checkpoint_file=kept)  # gw-a: a checkpoint at 6
    with psycopg.connect(migrated.superuser_url, autocommit=True) as conn:
        conn.execute("DELETE FROM audit_records WHERE instance = 'gw-a' AND seq > 4")
    with pytest.raises(AuditError, match=r"instance 'gw-a'\) ends at seq 4, .* seq 6"):
        write(migrated.gateway_url, 1, checkpoint_file=kept)
    assert write(migrated.gateway_url, 1, "gw-b", checkpoint_file=kept) == [4]
