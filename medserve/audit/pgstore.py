"""The audit store on PostgreSQL: several gateways, one database, one chain per gateway.

Selected by ``[audit] url = "postgresql://..."`` (SQLite stays the default); the driver is
psycopg 3 (:mod:`medserve.pgsql` says why). The store keeps the SQLite store's contract
(:class:`~medserve.audit.store.AuditStore`): a record is committed (``synchronous_commit``
as the server has it: on by default, so fsynced) before :meth:`PgStore.append` returns, and
one writer thread commits whatever has queued meanwhile in one transaction (group commit:
64 waiting requests cost one commit; nothing lingers waiting for more).

Chain design: **one chain per gateway instance.** Records are keyed ``(instance, seq)``;
each instance's writer numbers and HMAC-links its own records exactly as the SQLite chain
does, so gateways never wait on each other (no global lock, no global sequence), and
each chain verifies on its own. The first record of an instance's chain follows
:func:`instance_genesis` (a keyed hash of its name) rather than zeros, so rows moved from
one instance to another, or a chain renamed, break the chain. Two processes writing as the
same instance would fork its chain: the writer holds an advisory lock named after its
instance for as long as its connection lives (``kill -9`` frees it with the connection),
and a second one is refused at start. ``Settings.instance`` (default: the host name) is
the instance name; in Kubernetes the pod name, so a replaced pod starts a new chain.

Each instance registers itself (``audit_instances``) and signs its own checkpoints. Every
checkpoint also carries ``peers``: the latest checkpointed head (seq, hash) of every other
instance the database knows. So once two instances have checkpointed, removing one
instance's rows, checkpoints *and* registration (a superuser can) still leaves signed
evidence in the other instances' checkpoints, and ``verify`` reports the instance as
``removed``. What nothing inside the database can show: an instance removed before any
other instance checkpointed after it registered (at most ``checkpoint_interval_s``), or
every instance removed at once. ``checkpoint_file`` (exported checkpoints on other
storage, as for SQLite) closes that gap: verify with ``--checkpoints``.

Roles (README, "Several gateways on one PostgreSQL"): the owner role owns the tables and
applies migrations (the server does, when it logs in as the owner; otherwise
``medserve audit migrate --db <owner URL>``); the gateway role may INSERT and SELECT,
never UPDATE, DELETE or TRUNCATE; the auditor role may only SELECT. Grants are given to
the roles named in the settings, when they exist.

Faults: as the SQLite store (:mod:`medserve.audit.writer`), a batch whose transaction fails
(connection lost, database restarted) is retried once on a new connection when the
database's head shows it did not land (settled as written when it did); a reconnect
re-takes the lock (first terminating the writer's own previous server process, if a
network fault left it holding the lock) and re-reads the chain's head, so a commit whose
acknowledgement was lost is continued from, not forked. A batch that fails again is
reported lost; the next batch, or :meth:`PgStore.recover`, reconnects. Every statement is
bounded (``statement_timeout`` :data:`STATEMENT_TIMEOUT_S`, ``lock_timeout``
:data:`LOCK_TIMEOUT_S`): a database that stops answering fails the batch, never hangs it.

Limits: every gateway holds the audit secret, so a compromised gateway can append
records that verify to any instance's chain (append only: it cannot change or remove
one); per-gateway roles with row-level security on ``instance`` would confine it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medserve import pgsql
from medserve.audit import record
from medserve.audit.keys import ChainKeys
from medserve.audit.writer import AuditError, AuditWriteError, ChainWriter, Row

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)

COMPONENT = "audit"
TABLES = ("audit_instances", "audit_records", "audit_content", "audit_checkpoints")
MIGRATIONS = [
    # 1: one chain per instance (see the module docstring).
    """
    CREATE TABLE audit_instances (
        instance text PRIMARY KEY,
        registered_at text NOT NULL,
        key_id text NOT NULL
    );
    CREATE TABLE audit_records (
        instance text NOT NULL,
        seq bigint NOT NULL,
        ts text NOT NULL,
        kind text NOT NULL,
        body bytea NOT NULL,
        prev_hash bytea NOT NULL,
        hash bytea NOT NULL,
        PRIMARY KEY (instance, seq)
    );
    CREATE INDEX audit_records_ts ON audit_records (ts);
    CREATE TABLE audit_content (
        instance text NOT NULL,
        seq bigint NOT NULL,
        sealed bytea NOT NULL,
        PRIMARY KEY (instance, seq)
    );
    CREATE TABLE audit_checkpoints (
        instance text NOT NULL,
        seq bigint NOT NULL,
        body bytea NOT NULL,
        signature bytea NOT NULL,
        PRIMARY KEY (instance, seq)
    );
    """,
]
LOCK_WAIT_S = 15.0  # how long a restarted gateway waits for its dead predecessor's lock
# How long a reopen (writer thread, callers waiting) waits for its own lock: the backend of
# the connection it just dropped may hold it for a moment (it is terminated first, below).
REOPEN_LOCK_WAIT_S = 2.0
# The writer's session bounds. A statement is at most one batch (batch_max records, 1024 by
# default, one COPY) or a checkpoint; the store commits >= 5,000 records/s with 64 writers
# (README, benchmark), so the largest batch takes about 0.2 s: 30 s is over 100 times that,
# a slow disk is not mistaken for a dead one, and a database that has stopped answering
# fails the batch (its requests get their answer) within half a typical client's timeout.
# The writer's statements only wait for locks that DDL or a LOCK TABLE takes.
STATEMENT_TIMEOUT_S = 30.0
LOCK_TIMEOUT_S = 10.0
MIGRATE_HINT = "run `medserve audit migrate --db <the owner role's URL>`"


def instance_genesis(keys: ChainKeys, instance: str) -> bytes:
    """The "previous hash" of an instance's first record: binds the chain to its name."""
    return keys.record_hash(record.GENESIS, record.canonical({"instance": instance, "v": 1}))


def checkpoint_body(
    instance: str, seq: int, hash_hex: str, ts: str, key_id: str, peers: dict[str, list[Any]]
) -> bytes:
    """The bytes a checkpoint's signature covers: this instance's head and its peers'
    latest checkpointed heads (``{instance: [seq, hash hex]}``)."""
    return record.canonical(
        {
            "v": record.VERSION,
            "instance": instance,
            "seq": seq,
            "hash": hash_hex,
            "ts": ts,
            "key_id": key_id,
            "peers": peers,
        }
    )


def grants(
    gateway_role: str, auditor_role: str
) -> Callable[[psycopg.Connection, pgsql.Granted], None]:
    """The migration's grants: gateway INSERT + SELECT, auditor SELECT, nothing else."""

    def apply(conn: psycopg.Connection, granted: pgsql.Granted) -> None:
        pgsql.grant(conn, "SELECT", ["schema_version"], gateway_role, granted)
        pgsql.grant(conn, "SELECT, INSERT", list(TABLES), gateway_role, granted)
        pgsql.grant(conn, "SELECT", ["schema_version", *TABLES], auditor_role, granted)

    return apply


def open_schema(
    conn: psycopg.Connection,
    url: str,
    *,
    gateway_role: str,
    auditor_role: str,
    granted: pgsql.Granted | None = None,
) -> int:
    """Apply pending migrations (as the owner) or check there are none; SchemaError.
    Returns the schema's version; ``granted`` says what the grants did."""
    return pgsql.migrate(
        conn,
        COMPONENT,
        MIGRATIONS,
        grants(gateway_role, auditor_role),
        url=url,
        migrate_hint=MIGRATE_HINT,
        granted=granted,
    )


class PgStore(ChainWriter):
    """One gateway instance's chain in a shared PostgreSQL database. See the module
    docstring; the writer thread is :class:`~medserve.audit.writer.ChainWriter`'s."""

    instance: str

    def __init__(
        self,
        url: str,
        instance: str,
        keys: ChainKeys,
        signer: Ed25519PrivateKey,
        *,
        checkpoint_every: int = 1000,
        checkpoint_interval_s: float = 300.0,
        checkpoint_file: Path | None = None,
        gateway_role: str = "medserve_gateway",
        auditor_role: str = "medserve_auditor",
        batch_max: int = 1024,
        lock_wait_s: float = LOCK_WAIT_S,
    ) -> None:
        self._genesis = instance_genesis(keys, instance)
        super().__init__(
            keys,
            signer,
            genesis=self._genesis,
            checkpoint_every=checkpoint_every,
            checkpoint_interval_s=checkpoint_interval_s,
            checkpoint_file=checkpoint_file,
            batch_max=batch_max,
            thread_name="medserve-audit-pg",
        )
        self.url = url
        self.lock_wait_s = lock_wait_s
        self.instance = instance
        self.gateway_role = gateway_role
        self.auditor_role = auditor_role
        self._conn: psycopg.Connection | None = None
        # (pid, backend_start) of the writer's current or last connection's server process.
        self._backend: tuple[int, Any] | None = None

    def __repr__(self) -> str:
        return f"PgStore({pgsql.redact(self.url)!r}, instance={self.instance!r})"

    # -- life cycle ------------------------------------------------------------------

    def open(self) -> None:
        """Connect, migrate or check the schema, take this instance's lock, register it,
        check its chain's head, start the writer. :class:`AuditError` says what to fix
        (the URL in it has no password)."""
        try:
            self._conn = self._connect(wait_s=self.lock_wait_s)
            last_cp = self._last_checkpoint(self._conn)
        except pgsql.DatabaseError as exc:
            self._release()
            raise AuditError(str(exc)) from None
        except AuditError:
            self._release()
            raise
        self._start(last_cp)

    def close(self) -> None:
        """Write everything queued, sign a final checkpoint, stop the writer."""
        self._stop()
        self._release()

    def journal_ids(self) -> set[int]:
        """The key journal entries already copied into this instance's chain
        (:func:`record.journal_ids`), read on a connection of its own. Raises
        :class:`AuditError` (no password in it)."""
        import psycopg

        try:
            with pgsql.connect(self.url) as conn:
                rows = conn.execute(
                    "SELECT body FROM audit_records WHERE instance = %s AND kind = 'event'",
                    (self.instance,),
                ).fetchall()
        except pgsql.DatabaseError as exc:
            raise AuditError(str(exc)) from None
        except psycopg.Error as exc:
            reason = pgsql.scrub(str(exc), self.url)
            raise AuditError(f"cannot read {pgsql.redact(self.url)}: {reason}") from None
        return record.journal_ids(bytes(body) for (body,) in rows)

    def _release(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = None

    def _connect(self, *, wait_s: float) -> psycopg.Connection:
        """A writer's connection: schema current, instance lock held, instance registered,
        head read and checked. Raises :class:`AuditError` / ``pgsql.DatabaseError``."""
        import psycopg

        conn = pgsql.connect(  # transactions are explicit
            self.url,
            autocommit=True,
            statement_timeout_s=STATEMENT_TIMEOUT_S,
            lock_timeout_s=LOCK_TIMEOUT_S,
        )
        try:
            open_schema(
                conn, self.url, gateway_role=self.gateway_role, auditor_role=self.auditor_role
            )
            self._end_previous(conn)
            self._lock(conn, wait_s)
            row = conn.execute(
                "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
            ).fetchone()
            self._backend = (int(row[0]), row[1]) if row else None
            with conn.transaction():  # an error inside rolls the registration back
                other = conn.execute(
                    "SELECT key_id FROM audit_instances WHERE key_id <> %s LIMIT 1",
                    (self.keys.key_id,),
                ).fetchone()
                if other:
                    raise AuditError(
                        "the audit secret does not match the audit log in "
                        f"{pgsql.redact(self.url)} (log key id {other[0]}, this secret "
                        f"{self.keys.key_id}): every gateway on one database uses the same "
                        "audit secret; restore the one the log was written with"
                    )
                conn.execute(
                    "INSERT INTO audit_instances VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                    (self.instance, record.now(), self.keys.key_id),
                )
            self._head = self._check_head(conn)
            conn.commit()
        except psycopg.Error as exc:
            conn.close()
            raise pgsql.DatabaseError(
                f"the audit log in {pgsql.redact(self.url)}: {pgsql.scrub(str(exc), self.url)}"
            ) from None
        except (AuditError, pgsql.DatabaseError):
            conn.close()
            raise
        return conn

    def _end_previous(self, conn: psycopg.Connection) -> None:
        """Terminate the server process of this writer's previous connection if it still
        runs. The writer dropped that connection, but after a network fault the server may
        not have noticed (until its TCP keep-alive gives up: hours by default), and that
        process still holds this instance's lock. It is known by its pid *and* start time,
        so it is never another session that took the same pid. Failing that (no right to
        signal it), the bounded lock wait decides."""
        import psycopg

        if self._backend is None:
            return
        pid, started = self._backend
        with contextlib.suppress(psycopg.Error):
            conn.execute(
                "SELECT pg_terminate_backend(pid, 2000) FROM pg_stat_activity "
                "WHERE pid = %s AND backend_start = %s AND pid <> pg_backend_pid()",
                (pid, started),
            )
        conn.rollback()

    def _lock(self, conn: psycopg.Connection, wait_s: float) -> None:
        """Hold this instance's advisory lock for the connection's life (bounded wait: a
        killed predecessor's connection takes a moment to be noticed and closed)."""
        deadline = time.monotonic() + wait_s
        while True:
            row = conn.execute(
                "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))",
                (f"medserve-audit:{self.instance}",),
            ).fetchone()
            conn.commit()
            if row and row[0]:
                return
            if time.monotonic() >= deadline:
                raise AuditError(
                    f"another gateway is writing the audit log as instance {self.instance!r} "
                    "(its lock is held): give every gateway its own `instance` name, or the "
                    "chain would fork"
                )
            time.sleep(0.2)

    def _check_head(self, conn: psycopg.Connection) -> tuple[int, bytes]:
        row = conn.execute(
            "SELECT seq, body, prev_hash, hash FROM audit_records WHERE instance = %s "
            "ORDER BY seq DESC LIMIT 1",
            (self.instance,),
        ).fetchone()
        if row is None:
            return 0, self._genesis
        seq, body, prev_hash, stored = row
        if self.keys.record_hash(bytes(prev_hash), bytes(body)) != bytes(stored):
            raise AuditError(
                f"the last audit record of instance {self.instance!r} (seq {seq}) does not "
                "verify; run `medserve audit verify` and preserve the database first"
            )
        return int(seq), bytes(stored)

    def _last_checkpoint(self, conn: psycopg.Connection) -> int:
        row = conn.execute(
            "SELECT coalesce(max(seq), 0) FROM audit_checkpoints WHERE instance = %s",
            (self.instance,),
        ).fetchone()
        conn.commit()
        return int(row[0]) if row else 0

    # -- the writer's hooks (writer thread) --------------------------------------------

    def _connected(self) -> bool:
        return self._conn is not None

    def _reopen(self) -> None:
        try:
            self._conn = self._connect(wait_s=min(self.lock_wait_s, REOPEN_LOCK_WAIT_S))
        except pgsql.DatabaseError as exc:
            raise AuditError(str(exc)) from None

    def _drop(self) -> None:
        self._release()

    def _commit(self, rows: Sequence[Row]) -> None:
        import psycopg

        assert self._conn is not None
        conn = self._conn
        try:
            with conn.transaction(), conn.cursor() as cur:
                with cur.copy(
                    "COPY audit_records (instance, seq, ts, kind, body, prev_hash, hash) FROM STDIN"
                ) as copy:
                    for r in rows:
                        copy.write_row(
                            (self.instance, r.seq, r.ts, r.kind, r.body, r.prev_hash, r.hash)
                        )
                if any(r.sealed is not None for r in rows):
                    with cur.copy("COPY audit_content (instance, seq, sealed) FROM STDIN") as cp:
                        for r in rows:
                            if r.sealed is not None:
                                cp.write_row((self.instance, r.seq, r.sealed))
        except psycopg.Error as exc:
            raise AuditWriteError(_sqlstate(exc)) from None

    def _sign_checkpoint(self, seq: int, hash_hex: str) -> tuple[bytes, bytes]:
        """Sign the head with every peer's latest checkpointed head, in one transaction."""
        import psycopg

        assert self._conn is not None
        conn = self._conn
        try:
            with conn.transaction():
                peers = _peers(conn, self.instance)
                body = checkpoint_body(
                    self.instance, seq, hash_hex, record.now(), self.signer_id, peers
                )
                signature = self.signer.sign(body)
                conn.execute(
                    "INSERT INTO audit_checkpoints VALUES (%s, %s, %s, %s)",
                    (self.instance, seq, body, signature),
                )
        except psycopg.Error as exc:
            raise AuditWriteError(_sqlstate(exc)) from None
        return body, signature


def _peers(conn: psycopg.Connection, instance: str) -> dict[str, list[Any]]:
    """Every other registered instance's latest checkpointed head, ``[seq, hash hex]``
    (``[0, ""]``: registered, not checkpointed yet)."""
    peers: dict[str, list[Any]] = {}
    for (name,) in conn.execute(
        "SELECT instance FROM audit_instances WHERE instance <> %s", (instance,)
    ).fetchall():
        peers[str(name)] = [0, ""]
    for name, seq, body in conn.execute(
        "SELECT DISTINCT ON (instance) instance, seq, body FROM audit_checkpoints "
        "WHERE instance <> %s ORDER BY instance, seq DESC",
        (instance,),
    ).fetchall():
        try:
            peers[str(name)] = [int(seq), str(json.loads(bytes(body))["hash"])]
        except (ValueError, KeyError, TypeError):
            continue  # a damaged peer checkpoint: verify reports it; vouch for nothing
    return peers


def _sqlstate(exc: Exception) -> str:
    """The error's SQLSTATE class name for logs (e.g. ``UniqueViolation``): no data."""
    return type(exc).__name__


def read_checkpoints(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Every instance's checkpoints in the exported line format (JSON object + signature)."""
    out = []
    for body, signature in conn.execute(
        "SELECT body, signature FROM audit_checkpoints ORDER BY instance, seq"
    ).fetchall():
        try:
            line = json.loads(bytes(body))
        except ValueError:
            line = {"malformed": bytes(body).hex()}
        out.append({**line, "signature": bytes(signature).hex()})
    return out
