"""The append-only audit store: SQLite in WAL mode, one writer thread, group commit.

Requests hand their facts to :meth:`SQLiteStore.append` and wait until the record is
durable (``synchronous=FULL``: the WAL is fsynced before the commit returns). One writer
thread takes whatever has queued up meanwhile and commits it in one transaction, so 64
concurrent requests cost one fsync, not 64. The writer alone assigns sequence numbers and
chain hashes, so the chain order is the commit order, and a crash loses at most
transactions that never committed: SQLite's atomic commit means a half record cannot
exist, and verification never sees one.

Checkpoints: every ``checkpoint_every`` records (or ``checkpoint_interval_s``, and on
close) the writer signs ``(seq, hash)`` with the Ed25519 key, stores it, and appends it to
an optional file meant to live elsewhere (another volume, a WORM share).

The database refuses UPDATE and DELETE of records by trigger. That stops accidents, not
an attacker with write access, who can drop the trigger: the keyed chain and the exported
checkpoints are what catch them. A second process opening the same file for writing is
refused (a lock file), because two writers would fork the chain.

Faults. :meth:`SQLiteStore.open` proves the file writable by committing a write (SQLite
would otherwise open a read-only file read-only without a word, and every later record
would fail), so a server refuses to start on a log it cannot write, with a message that
names the path and what to fix. A write that fails at run time (disk full, file made
read-only, I/O error) closes the writer's connection; the next batch, or a :meth:`recover`
request, opens a new one, proves it writable the same way, and re-reads the chain's head
from the file before writing: the chain goes on from the last record the file holds, and
the store refuses to go on (stays failed) if the file no longer holds the records this
writer committed. The records of a failed batch are never retried: their callers were told
(:class:`AuditWriteError`, or ``on_lost``).

The :class:`AuditStore` protocol is what the server needs. The writer thread, the queue,
group commit, the lost-batch rule and checkpoint timing are shared with the PostgreSQL
store for several gateways on one database (:mod:`medserve.audit.pgstore`: one chain per
gateway instance) in :mod:`medserve.audit.writer`; this module supplies the SQLite file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medserve.audit import record
from medserve.audit.keys import ChainKeys
from medserve.audit.writer import AuditError as AuditError
from medserve.audit.writer import AuditWriteError as AuditWriteError
from medserve.audit.writer import ChainWriter, Row
from medserve.audit.writer import Lost as Lost
from medserve.audit.writer import StoreStats as StoreStats
from medserve.sqlite_wal import use_wal

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
WAL_MERGE_S = 1.0  # how often the WAL is copied into the database
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    ts TEXT NOT NULL,
    kind TEXT NOT NULL,
    body BLOB NOT NULL,
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS records_ts ON records (ts);
CREATE TABLE IF NOT EXISTS content (seq INTEGER PRIMARY KEY, sealed BLOB NOT NULL) STRICT;
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY,
    body BLOB NOT NULL,
    signature BLOB NOT NULL
) STRICT;
CREATE TRIGGER IF NOT EXISTS records_append_only_u BEFORE UPDATE ON records
    BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER IF NOT EXISTS records_append_only_d BEFORE DELETE ON records
    BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER IF NOT EXISTS checkpoints_append_only_u BEFORE UPDATE ON checkpoints
    BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only'); END;
CREATE TRIGGER IF NOT EXISTS checkpoints_append_only_d BEFORE DELETE ON checkpoints
    BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only'); END;
CREATE TRIGGER IF NOT EXISTS content_no_update BEFORE UPDATE ON content
    BEGIN SELECT RAISE(ABORT, 'captured content cannot be changed, only purged'); END;
"""


class AuditStore(Protocol):
    """What the server needs from an audit store."""

    stats: StoreStats
    keys: ChainKeys
    on_commit: Callable[[float], object] | None

    def open(self) -> None: ...
    def close(self) -> None: ...
    def submit(
        self, facts: record.Facts, sealed: bytes | None = None, on_lost: Lost | None = None
    ) -> None: ...
    async def append(self, facts: record.Facts, sealed: bytes | None = None) -> int: ...
    def available(self) -> bool: ...
    def recover(self) -> None: ...
    def journal_ids(self) -> set[int]: ...


def connect(
    path: Path, *, readonly: bool = False, busy_timeout_ms: int = 5000
) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, full fsync."""
    if readonly:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        use_wal(conn, timeout_s=busy_timeout_ms / 1000)
        conn.execute("PRAGMA synchronous=FULL")
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    return conn


def checkpoint_message(seq: int, hash_hex: str, ts: str, key_id: str) -> bytes:
    """The bytes a checkpoint signature covers."""
    return record.canonical(
        {"v": record.VERSION, "seq": seq, "hash": hash_hex, "ts": ts, "key_id": key_id}
    )


class SQLiteStore(ChainWriter):
    """One SQLite file, one writer thread. See the module docstring."""

    def __init__(
        self,
        path: Path,
        keys: ChainKeys,
        signer: Ed25519PrivateKey,
        *,
        checkpoint_every: int = 1000,
        checkpoint_interval_s: float = 300.0,
        checkpoint_file: Path | None = None,
        busy_timeout_ms: int = 5000,
        batch_max: int = 1024,
    ) -> None:
        super().__init__(
            keys,
            signer,
            genesis=record.GENESIS,
            checkpoint_every=checkpoint_every,
            checkpoint_interval_s=checkpoint_interval_s,
            checkpoint_file=checkpoint_file,
            batch_max=batch_max,
            thread_name="medserve-audit",
        )
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self._conn: sqlite3.Connection | None = None
        self._lock: IO[bytes] | None = None
        self._merger: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- life cycle ------------------------------------------------------------------

    def open(self) -> None:
        """Create or reopen the log, check it continues with this key and can be written,
        start the writer.

        Raises :class:`AuditError` naming the path and what to fix: a directory that cannot
        be created, a file or directory this process cannot write, a file that is not an
        SQLite database, a full disk, a log whose last record does not verify.
        """
        prepare_directory(self.path)
        if not self.path.exists():
            # Owner-only from the first byte: SQLite gives its -wal and -shm files the
            # same mode. The log holds no text, but it does hold who asked what, when.
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except OSError as exc:
                raise AuditError(
                    f"cannot create the audit log {self.path}: {exc.strerror}: {_FIX_DIR}"
                ) from None
        self._lock = _lock_file(self.path.with_name(self.path.name + ".lock"))
        try:
            self._conn = self._connect()
            self._head = self._check_head(self._conn)
            last_cp = self._conn.execute("SELECT max(seq) FROM checkpoints").fetchone()[0] or 0
        except sqlite3.Error as exc:
            self._release()
            raise AuditError(explain(self.path, exc)) from None
        except AuditError:
            self._release()
            raise
        self._stopping.clear()
        self._start(last_cp)
        self._merger = threading.Thread(target=self._merge, name="medserve-audit-wal", daemon=True)
        self._merger.start()

    def close(self) -> None:
        """Write everything queued, sign a final checkpoint, stop the writer."""
        self._stop()
        if self._merger is not None:
            self._stopping.set()
            self._merger.join()
            self._merger = None
        self._release()

    def journal_ids(self) -> set[int]:
        """The key journal entries already copied into this log (:func:`record.journal_ids`),
        read on a connection of its own. Raises :class:`AuditError`."""
        try:
            conn = connect(self.path, readonly=True)
            try:
                rows = conn.execute("SELECT body FROM records WHERE kind = 'event'").fetchall()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise AuditError(explain(self.path, exc)) from None
        return record.journal_ids(body for (body,) in rows)

    def _merge(self) -> None:
        """Copy the WAL into the database every WAL_MERGE_S seconds, off the commit path.

        A failed merge closes the connection and the next round opens a new one, so a
        fault that is repaired (a full disk, a file made read-only) is recovered from.
        """
        conn: sqlite3.Connection | None = None
        failing = False
        try:
            while not self._stopping.wait(WAL_MERGE_S):
                try:
                    conn = conn or connect(self.path, busy_timeout_ms=0)
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    failing = False
                except sqlite3.Error as exc:
                    _close(conn)
                    conn = None
                    if not failing:  # once per outage, not once a second
                        log.warning("audit WAL merge failed", extra={"error": _name(exc)})
                    failing = True
            with contextlib.suppress(sqlite3.Error):
                conn = conn or connect(self.path, busy_timeout_ms=0)
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            _close(conn)

    def _release(self) -> None:
        _close(self._conn)
        self._conn = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _connect(self) -> sqlite3.Connection:
        """A writer's connection to the log, proven writable; raises :class:`AuditError`.

        SQLite opens a file it cannot write read-only without an error, and its reads
        then work: only a committed write shows the file, its directory (the -wal and
        -shm files) and the disk can take a record. The probe is one row of ``meta``.
        """
        conn: sqlite3.Connection | None = None
        try:
            conn = connect(self.path, busy_timeout_ms=self.busy_timeout_ms)
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            if mode != "wal":
                raise AuditError(
                    f"the audit log {self.path} cannot use write-ahead logging (journal mode "
                    f"{mode}): {_FIX_DIR}"
                )
            conn.executescript(SCHEMA)
            self._check_meta(conn)
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('writable_at', ?)", (record.now(),))
            # WAL pages are copied into the database by a thread of its own (a checkpoint
            # fsyncs the database; done on the commit path it would stall every waiting
            # request), so the writer's connection never checkpoints by itself.
            conn.execute("PRAGMA wal_autocheckpoint=0")
        except sqlite3.Error as exc:
            _close(conn)
            raise AuditError(explain(self.path, exc)) from None
        except AuditError:
            _close(conn)
            raise
        return conn

    def _reconnect(self) -> None:
        """Replace a failed connection (writer thread): a new one, proven writable, and
        the head re-read from the file. Raises :class:`AuditError` and stays closed."""
        conn = self._connect()
        try:
            head = self._continue_from(conn)
            last_cp = conn.execute("SELECT max(seq) FROM checkpoints").fetchone()[0] or 0
        except sqlite3.Error as exc:
            _close(conn)
            raise AuditError(explain(self.path, exc)) from None
        except AuditError:
            _close(conn)
            raise
        if head[0] > self._head[0]:
            # A commit reported as failed reached the file after all (an fsync error
            # after the write): its records stand, and the chain goes on after them.
            log.warning(
                "audit records reported as lost were committed",
                extra={"count": head[0] - self._head[0]},
            )
        self._conn, self._head = conn, head
        self.stats.last_seq = head[0]
        self._checkpointed = (last_cp, self._checkpointed[1])
        log.warning("audit log reopened", extra={"path": str(self.path), "count": head[0]})

    def _continue_from(self, conn: sqlite3.Connection) -> tuple[int, bytes]:
        """The file's head, checked to continue the chain this writer last committed."""
        seq, digest = self._head
        rows = conn.execute(
            "SELECT seq, body, prev_hash, hash FROM records WHERE seq >= ? ORDER BY seq",
            (seq,),
        ).fetchall()
        if seq > 0:
            if not rows or rows[0][0] != seq or bytes(rows[0][3]) != digest:
                raise AuditError(
                    f"the audit log {self.path} no longer holds record {seq} as this server "
                    "wrote it: preserve the file and run `medserve audit verify`"
                )
            rows = rows[1:]
        for row_seq, body, prev_hash, stored in rows:
            ok = row_seq == seq + 1 and bytes(prev_hash) == digest
            if not ok or self.keys.record_hash(prev_hash, body) != stored:
                raise AuditError(
                    f"the audit log {self.path} does not continue its chain at record "
                    f"{row_seq}: preserve the file and run `medserve audit verify`"
                )
            seq, digest = int(row_seq), bytes(stored)
        return seq, digest

    def _check_meta(self, conn: sqlite3.Connection) -> None:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if not meta:
            conn.executemany(
                "INSERT INTO meta VALUES (?, ?)",
                [
                    ("schema", SCHEMA_VERSION),
                    ("key_id", self.keys.key_id),
                    ("created", record.now()),
                ],
            )
            return
        if meta.get("schema") != SCHEMA_VERSION:
            raise AuditError(
                f"{self.path} has audit schema {meta.get('schema')}, not {SCHEMA_VERSION}"
            )
        if meta.get("key_id") != self.keys.key_id:
            raise AuditError(
                f"the audit secret does not match {self.path} (log key id {meta.get('key_id')}, "
                f"this secret {self.keys.key_id}): restore the secret the log was written with"
            )

    def _check_head(self, conn: sqlite3.Connection) -> tuple[int, bytes]:
        row = conn.execute(
            "SELECT seq, body, prev_hash, hash FROM records ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        if row is None:
            return 0, record.GENESIS
        seq, body, prev_hash, stored = row
        if self.keys.record_hash(prev_hash, body) != stored:
            raise AuditError(
                f"the last audit record (seq {seq}) does not verify; run `medserve audit verify` "
                "and preserve the file before anything else"
            )
        return int(seq), bytes(stored)

    # -- the writer's hooks (writer thread) --------------------------------------------

    def _connected(self) -> bool:
        return self._conn is not None

    def _reopen(self) -> None:
        self._reconnect()

    def _drop(self) -> None:
        if self._conn is not None:
            _rollback(self._conn)
            _close(self._conn)
            self._conn = None

    def _commit(self, rows: Sequence[Row]) -> None:
        assert self._conn is not None
        records = [(r.seq, r.ts, r.kind, r.body, r.prev_hash, r.hash) for r in rows]
        content = [(r.seq, r.sealed) for r in rows if r.sealed is not None]
        try:
            # Few statements per batch, each inserting many rows: the sqlite3 module drops
            # the GIL around every statement, and under load each hand-back waits for the
            # event loop's thread. executemany would pay that once per row.
            if content or len(records) > INSERT_ROWS:
                self._conn.execute("BEGIN IMMEDIATE")
                _insert(self._conn, "records", records)
                if content:
                    _insert(self._conn, "content", content)
                self._conn.execute("COMMIT")
            else:  # one statement is its own atomic transaction
                _insert(self._conn, "records", records)
        except sqlite3.Error as exc:
            raise AuditWriteError(_name(exc)) from None

    def _sign_checkpoint(self, seq: int, hash_hex: str) -> tuple[bytes, bytes]:
        assert self._conn is not None
        message = checkpoint_message(seq, hash_hex, record.now(), self.signer_id)
        signature = self.signer.sign(message)
        try:
            self._conn.execute(
                "INSERT INTO checkpoints VALUES (?, ?, ?)", (seq, message, signature)
            )
        except sqlite3.Error as exc:
            raise AuditWriteError(_name(exc)) from None
        return message, signature


INSERT_ROWS = 1000  # rows per INSERT: 6 columns x 1000 stays below SQLite's 32766 variables


def _insert(conn: sqlite3.Connection, table: str, rows: Sequence[tuple[Any, ...]]) -> None:
    """Insert ``rows`` with one multi-row statement per INSERT_ROWS rows."""
    width = len(rows[0])
    one = "(" + ", ".join("?" * width) + ")"
    for start in range(0, len(rows), INSERT_ROWS):
        chunk = rows[start : start + INSERT_ROWS]
        values = ", ".join([one] * len(chunk))
        conn.execute(f"INSERT INTO {table} VALUES {values}", [v for row in chunk for v in row])


def _close(conn: sqlite3.Connection | None) -> None:
    """Close ``conn`` if there is one, ignoring errors (it may be the broken one)."""
    if conn is not None:
        with contextlib.suppress(sqlite3.Error):
            conn.close()


def _name(exc: sqlite3.Error) -> str:
    """SQLite's error name (SQLITE_FULL, SQLITE_READONLY...), for logs: no data."""
    return getattr(exc, "sqlite_errorname", None) or type(exc).__name__


_FIX_DIR = (
    "the file and its directory must be writable by the user medserve runs as "
    "(SQLite creates the -wal and -shm files beside the log)"
)


def explain(path: Path, exc: sqlite3.Error) -> str:
    """What an SQLite error on opening or writing the log at ``path`` means, and the fix."""
    name = _name(exc)
    detail = f"{name}: {exc}"
    if name.startswith("SQLITE_READONLY"):
        return f"the audit log {path} cannot be written ({detail}): {_FIX_DIR}"
    if name.startswith("SQLITE_CANTOPEN"):
        return f"cannot open the audit log {path} ({detail}): {_FIX_DIR}"
    if name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")):
        return (
            f"{path} is not an SQLite audit log, or is damaged ({detail}): preserve the "
            "file, check it with `medserve audit verify`, and set audit.path to the log"
        )
    if name.startswith("SQLITE_FULL"):
        return f"the disk holding the audit log {path} is full ({detail}): free space on it"
    if name.startswith("SQLITE_IOERR"):
        return f"I/O error on the audit log {path} ({detail}): check its disk and mount"
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return f"the audit log {path} is locked by another connection ({detail})"
    return f"cannot open the audit log {path} ({detail})"


def prepare_directory(path: Path) -> None:
    """Create the log's directory (owner-only) if missing; :class:`AuditError` if not."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise AuditError(
            f"cannot create the audit log's directory {path.parent}: {exc.strerror}: create "
            "it, writable by the user medserve runs as, or set audit.path"
        ) from None


def _rollback(conn: sqlite3.Connection) -> None:
    # No transaction may be open (BEGIN itself failed): nothing to undo then.
    with contextlib.suppress(sqlite3.Error):
        conn.execute("ROLLBACK")


def _lock_file(path: Path) -> IO[bytes]:
    try:
        handle = path.open("ab")
    except OSError as exc:
        raise AuditError(
            f"cannot create the audit log's lock file {path}: {exc.strerror}: {_FIX_DIR}"
        ) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise AuditError(
            f"another process is writing the audit log ({path} is locked): one server per "
            "audit file, or the chain would fork"
        ) from None
    return handle


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_checkpoints(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """The database's own checkpoints in the exported line format."""
    out = []
    for message, signature in conn.execute("SELECT body, signature FROM checkpoints ORDER BY seq"):
        out.append({**json.loads(message), "signature": bytes(signature).hex()})
    return out
