"""The group-commit writer both audit stores share: one thread, one chain, one commit per
batch.

Requests hand their facts to :meth:`ChainWriter.append` (wait until durable) or
:meth:`ChainWriter.submit` (fire and forget, with an ``on_lost`` callback). One writer
thread takes whatever has queued up meanwhile (at most ``batch_max`` records), numbers and
HMAC-links the records, and hands them to the store's :meth:`ChainWriter._commit` as one
transaction; nothing lingers waiting for more. So 64 concurrent requests cost one commit,
the chain order is the commit order, and a crash loses at most a transaction that never
committed.

A batch whose commit fails gets one more chance: the writer drops the connection and
reopens (:meth:`ChainWriter._reopen` re-reads the chain's head from the database). If the
head is still where the batch started, the batch is committed once more on the new
connection; if the head is the batch's last record, the commit had landed and only its
acknowledgement was lost, and the batch is settled as written. So a connection that died
while idle (a database restarted, a proxy's idle cut) costs no record. Otherwise, or when
the retry fails too, the batch is lost: its callers get :class:`AuditWriteError` (or
``on_lost``), and the store is not :meth:`~ChainWriter.available` until a later batch or
a :meth:`~ChainWriter.recover` request reopens it. Checkpoints get the same one retry.

Checkpoints: every ``checkpoint_every`` records, every ``checkpoint_interval_s`` seconds
when records were written, and at close, the store signs its head
(:meth:`ChainWriter._sign_checkpoint`) and the writer appends the signed line to the
optional ``checkpoint_file`` (meant to live on other storage).

What a store supplies is its connection: :class:`~medserve.audit.store.SQLiteStore` (one
file) and :class:`~medserve.audit.pgstore.PgStore` (one instance's chain in PostgreSQL).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medserve.audit import record
from medserve.audit.keys import ChainKeys, key_fingerprint

log = logging.getLogger(__name__)


class AuditError(Exception):
    """The audit store cannot be opened or used; the message says what to fix."""


class AuditWriteError(AuditError):
    """A record could not be made durable. Carries the failure's type, never data."""


@dataclass
class StoreStats:
    """Counters for metrics and /ready; written by the writer thread only."""

    written: int = 0
    failed: int = 0
    checkpoints: int = 0
    last_seq: int = 0


Lost = Callable[[], object]


@dataclass(frozen=True, slots=True)
class Entry:
    """A queued record: its facts, optional sealed content, and who to tell."""

    facts: record.Facts
    sealed: bytes | None
    # An awaiting caller's future and its loop, or a callback for a lost record.
    waiter: asyncio.Future[int] | None = None
    loop: asyncio.AbstractEventLoop | None = None
    on_lost: Lost | None = None


@dataclass(frozen=True, slots=True)
class Row:
    """One record as the writer chained it, for a store to insert.

    ``hash`` is HMAC(audit key, ``prev_hash`` + ``body``) (:meth:`ChainKeys.record_hash`);
    ``sealed`` is the encrypted captured content, if any (its own table).
    """

    seq: int
    ts: str
    kind: str
    body: bytes
    prev_hash: bytes
    hash: bytes
    sealed: bytes | None


_STOP = object()
_RECOVER = object()


class ChainWriter(ABC):
    """The writer thread and the queue in front of it; subclasses own the connection.

    Hooks (all called on the writer thread): :meth:`_connected`, :meth:`_reopen`,
    :meth:`_commit`, :meth:`_drop`, :meth:`_sign_checkpoint`. ``_head`` is
    ``(seq, hash)`` of the last committed record (``(0, genesis)`` for an empty chain).
    """

    def __init__(
        self,
        keys: ChainKeys,
        signer: Ed25519PrivateKey,
        *,
        genesis: bytes,
        checkpoint_every: int,
        checkpoint_interval_s: float,
        checkpoint_file: Path | None,
        batch_max: int,
        thread_name: str,
    ) -> None:
        self.keys = keys
        self.signer = signer
        self.signer_id = key_fingerprint(signer.public_key())
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval_s = checkpoint_interval_s
        self.checkpoint_file = checkpoint_file
        self.batch_max = batch_max
        self.stats = StoreStats()
        # Called on the writer thread with the seconds each successful commit took.
        self.on_commit: Callable[[float], object] | None = None
        self._thread_name = thread_name
        self._queue: queue.SimpleQueue[Entry | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._head = (0, genesis)
        self._checkpointed = (0, time.monotonic())
        self._failed_at: float | None = None
        self._recover_queued = threading.Event()

    # The chain's name where several share a database (PostgreSQL: the gateway instance).
    instance: str | None = None

    # -- what a store supplies -----------------------------------------------------------

    @abstractmethod
    def _connected(self) -> bool:
        """Whether the store holds a working connection (False after a failure)."""

    @abstractmethod
    def _reopen(self) -> None:
        """Open a new connection after a failure and re-read ``_head`` from the database.
        Raises :class:`AuditError` (saying what to fix) and stays closed."""

    @abstractmethod
    def _commit(self, rows: Sequence[Row]) -> None:
        """Insert ``rows`` (and their sealed content) in one transaction, durable when it
        returns. Raises :class:`AuditWriteError` naming the driver's error, never data."""

    @abstractmethod
    def _drop(self) -> None:
        """Roll back and close the connection after a failure, ignoring further errors."""

    @abstractmethod
    def _sign_checkpoint(self, seq: int, hash_hex: str) -> tuple[bytes, bytes]:
        """Sign and store a checkpoint of ``(seq, hash)``; return ``(body, signature)``,
        ``body`` being a JSON object. Raises :class:`AuditWriteError` if not stored."""

    # -- life cycle ------------------------------------------------------------------

    @abstractmethod
    def _release(self) -> None:
        """Close what :meth:`open` took (connection, locks), ignoring errors."""

    def _start(self, last_checkpoint: int) -> None:
        """Start the writer thread on the ``_head`` the store has read and checked.

        Raises :class:`AuditError` (and releases the store) when ``checkpoint_file``
        cannot be written, or vouches for records this chain no longer holds: a log
        restored from an older backup would otherwise reuse sequence numbers that signed
        checkpoints kept elsewhere already cover.
        """
        try:
            self._check_checkpoint_file()
        except AuditError:
            self._release()
            raise
        self.stats.last_seq = self._head[0]
        self._checkpointed = (last_checkpoint, time.monotonic())
        self._failed_at = None
        self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
        self._thread.start()

    def _check_checkpoint_file(self) -> None:
        path = self.checkpoint_file
        if path is None:
            return
        try:
            with path.open("a", encoding="utf-8"):
                pass
            vouched = _last_vouched(path, self.instance)
        except OSError as exc:
            raise AuditError(
                f"cannot write the audit checkpoint file {path}: {exc.strerror}: create its "
                "directory, writable by the user medserve runs as, or unset "
                "audit.checkpoint_file"
            ) from None
        if vouched > self._head[0]:
            chain = f" (instance {self.instance!r})" if self.instance else ""
            raise AuditError(
                f"the audit log{chain} ends at seq {self._head[0]}, but the checkpoint file "
                f"{path} vouches for seq {vouched}: the log was restored from an older "
                "backup, or cut. Preserve both and run `medserve audit verify --checkpoints "
                f"{path}`; to start a new log on purpose, move the checkpoint file aside"
            )

    def _stop(self) -> None:
        """Write everything queued, sign a final checkpoint, stop the writer."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None

    # -- writing -----------------------------------------------------------------------

    def submit(
        self, facts: record.Facts, sealed: bytes | None = None, on_lost: Lost | None = None
    ) -> None:
        """Queue a record without waiting; ``on_lost`` runs (on the writer thread) if it
        cannot be written."""
        if self._thread is None:
            if on_lost is not None:
                on_lost()
            return
        self._queue.put(Entry(facts, sealed, on_lost=on_lost))

    async def append(self, facts: record.Facts, sealed: bytes | None = None) -> int:
        """Write a record and wait until it is durable; returns its sequence number in the
        chain.

        Raises :class:`AuditWriteError`. Shielded: a caller that is cancelled (client
        gone) still gets its record written.
        """
        if self._thread is None:
            raise AuditWriteError("the audit store is closed")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[int] = loop.create_future()
        self._queue.put(Entry(facts, sealed, waiter, loop))
        return await asyncio.shield(waiter)

    def available(self) -> bool:
        """False from a failed commit until the next successful one (or a successful
        :meth:`recover`), and once closed."""
        alive = self._thread is not None and self._thread.is_alive()
        return alive and self._failed_at is None

    def recover(self) -> None:
        """Ask the writer to reopen a failed store now, without waiting (a readiness probe
        calls this: a server that gets no traffic while failed still recovers). At most
        one request is queued at a time; a no-op while the store is available."""
        if self._thread is None or self._failed_at is None or self._recover_queued.is_set():
            return
        self._recover_queued.set()
        self._queue.put(_RECOVER)

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self._until_checkpoint())
            except queue.Empty:
                self._maybe_checkpoint(force=False)
                continue
            if item is _RECOVER:
                self._recover()
                continue
            batch = [item] if isinstance(item, Entry) else []
            stop = item is _STOP or self._take(batch, self.batch_max)
            if stop:
                self._take(batch, None)  # whatever is left, before stopping
            if batch:
                try:
                    self._write(batch)
                except Exception as exc:  # a bug must not leave callers waiting forever
                    log.exception("audit writer failed")
                    self._fail(batch, AuditWriteError(type(exc).__name__))
            self._maybe_checkpoint(force=stop)
            if stop:
                return

    def _take(self, batch: list[Entry], limit: int | None) -> bool:
        """Move queued entries into ``batch`` (up to ``limit``); True if stop was queued."""
        stop = False
        while limit is None or len(batch) < limit:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Entry):
                batch.append(item)
            elif item is _STOP:
                stop = True
            else:  # _RECOVER: the batch's own write reopens the store if it can
                self._recover_queued.clear()
        return stop

    def _recover(self) -> None:
        """Reopen a failed store; the reopen's checks are what make it available again."""
        self._recover_queued.clear()
        if self._failed_at is None:
            return
        self._drop()
        try:
            self._reopen()
        except AuditError as exc:
            log.error("audit log still failing", extra={"error": str(exc)})
            return
        self._failed_at = None

    def _write(self, batch: list[Entry]) -> None:
        if not self._connected():  # the last write failed: a new connection, or fail again
            try:
                self._reopen()
            except AuditError as exc:
                log.error("audit log still failing", extra={"error": str(exc)})
                self._fail(batch, AuditWriteError("AuditError"))
                return
        started = time.perf_counter()
        start = self._head
        seq, prev = start
        rows: list[Row] = []
        for entry in batch:
            seq += 1
            ts = record.now()
            body = record.body(entry.facts, seq, ts)
            digest = self.keys.record_hash(prev, body)
            kind = "request" if isinstance(entry.facts, record.RequestFacts) else "event"
            rows.append(Row(seq, ts, kind, body, prev, digest, entry.sealed))
            prev = digest
        try:
            self._commit(rows)
        except AuditWriteError as exc:
            failure = self._retry(rows, start, exc)
            if failure is not None:
                log.error("audit write failed", extra={"error": str(failure), "count": len(batch)})
                self._fail(batch, failure)
                return
        self._head = (seq, prev)
        self._failed_at = None
        self.stats.written += len(batch)
        self.stats.last_seq = seq
        if self.on_commit is not None:
            self.on_commit(time.perf_counter() - started)
        _settle(batch, [row.seq for row in rows])

    def _retry(
        self, rows: Sequence[Row], start: tuple[int, bytes], error: AuditWriteError
    ) -> AuditWriteError | None:
        """After a failed commit of ``rows`` (chained from ``start``): drop the connection,
        reopen (which re-reads the head from the database) and settle the batch once more.
        None when it is written: the database's head was still ``start`` and the one retry
        on the new connection committed, or it already was the batch's last record (the
        commit landed and only its acknowledgement was lost). Otherwise the error that
        loses the batch. One retry, never more: a fault that persists (a full disk, a
        read-only file, a database that is down) fails the batch as before, a moment later.
        """
        self._drop()
        try:
            self._reopen()
        except AuditError as exc:
            log.error("audit log still failing", extra={"error": str(exc)})
            return error
        last = (rows[-1].seq, rows[-1].hash)
        if self._head == last:
            log.warning(
                "audit commit landed; its acknowledgement was lost", extra={"count": len(rows)}
            )
            return None
        if self._head != start:  # the chain moved otherwise: never write over or fork it
            return error
        try:
            self._commit(rows)
        except AuditWriteError as exc:
            self._drop()
            return exc
        log.warning("audit commit retried on a new connection", extra={"count": len(rows)})
        return None

    def _fail(self, batch: list[Entry], error: AuditWriteError) -> None:
        """The batch is lost: drop the connection (the next write opens a new one and
        re-reads the head), mark the store failed, tell every caller."""
        self._drop()
        self._failed_at = time.monotonic()
        self.stats.failed += len(batch)
        for entry in batch:
            if entry.on_lost is not None:
                entry.on_lost()
        _settle(batch, [error] * len(batch))

    # -- checkpoints ----------------------------------------------------------------------

    def _until_checkpoint(self) -> float:
        if not self._connected():  # failed: nothing to sign until a write reopens it
            return self.checkpoint_interval_s
        return max(0.05, self._checkpointed[1] + self.checkpoint_interval_s - time.monotonic())

    def _maybe_checkpoint(self, *, force: bool) -> None:
        seq, digest = self._head
        last, at = self._checkpointed
        elapsed = time.monotonic() - at >= self.checkpoint_interval_s
        if seq <= last:
            if elapsed:  # nothing new to sign: restart the clock rather than poll
                self._checkpointed = (last, time.monotonic())
            return
        if not (force or elapsed or seq - last >= self.checkpoint_every):
            return
        if not self._connected():
            return
        try:
            body, signature = self._sign_checkpoint(seq, digest.hex())
        except AuditWriteError as exc:
            signed = self._retry_checkpoint(seq, digest)
            if signed is None:
                log.error("audit checkpoint failed", extra={"error": str(exc)})
                return
            body, signature = signed
        self._checkpointed = (seq, time.monotonic())
        self.stats.checkpoints += 1
        if self.checkpoint_file is not None:
            line = {**json.loads(body), "signature": signature.hex()}
            try:
                with self.checkpoint_file.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(line, sort_keys=True) + "\n")
            except OSError as exc:
                log.error("audit checkpoint file not written", extra={"error": type(exc).__name__})

    def _retry_checkpoint(self, seq: int, digest: bytes) -> tuple[bytes, bytes] | None:
        """A failed checkpoint's one retry on a new connection (as :meth:`_retry`), when the
        reopened database's head is still the one to sign; None when it cannot be signed
        (the connection is dropped then: the next batch reopens it)."""
        self._drop()
        try:
            self._reopen()
            if self._head != (seq, digest):
                raise AuditWriteError("the chain's head moved")
            return self._sign_checkpoint(seq, digest.hex())
        except AuditError as exc:
            log.error("audit log still failing", extra={"error": str(exc)})
            self._drop()
            return None


def _last_vouched(path: Path, instance: str | None) -> int:
    """The highest seq a checkpoint line of ``path`` vouches for in ``instance``'s chain
    (SQLite: lines without an instance); 0 when none. Unparsable lines are skipped
    (``verify`` reports them). Raises OSError."""
    highest = 0
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                item = json.loads(line)
                seq = int(item["seq"])
            except (ValueError, KeyError, TypeError):
                continue
            if isinstance(item, dict) and item.get("instance") == instance:
                highest = max(highest, seq)
    return highest


def _settle(batch: list[Entry], outcomes: Sequence[int | Exception]) -> None:
    """Hand each waiting caller its outcome: one wake-up per event loop per batch, not one
    per record (each cross-thread wake-up costs a syscall and a GIL hand-over)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[int], int | Exception]]]
    by_loop = {}
    for entry, outcome in zip(batch, outcomes, strict=True):
        if entry.waiter is not None and entry.loop is not None:
            by_loop.setdefault(entry.loop, []).append((entry.waiter, outcome))
    for loop, pairs in by_loop.items():
        # The loop is gone when the server stopped; its callers are gone with it.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_wake, pairs)


def _wake(pairs: list[tuple[asyncio.Future[int], int | Exception]]) -> None:
    for waiter, outcome in pairs:
        if waiter.done():
            continue
        if isinstance(outcome, Exception):
            waiter.set_exception(outcome)
        else:
            waiter.set_result(outcome)
