"""Switching an SQLite file to write-ahead logging when other connections may be opening
it at the same moment.

``PRAGMA journal_mode=WAL`` on a file still in rollback-journal mode needs the file to
itself. Two connections switching a new file together (a server process and a ``medserve
keys`` command opening a new keys file; seen in CI) can each hold the read lock the other
waits on: both wait out their busy timeout and fail with ``database is locked``. So the
switch is tried with no busy wait and retried after a short pause, during which the other
side's attempt completes; bounded by ``timeout_s``. Once the file is in WAL mode the
setting is persistent and the switch is a no-op.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable

RETRY_S = 0.02  # between tries; the lock is held for the length of one short statement


def use_wal(
    conn: sqlite3.Connection,
    *,
    timeout_s: float = 5.0,
    pause: Callable[[float], object] = time.sleep,
) -> str:
    """Put ``conn``'s file in WAL mode, retrying while another connection has it locked;
    returns the journal mode now in force (``wal``, or ``memory`` for an in-memory one).
    Raises :class:`sqlite3.OperationalError` after ``timeout_s`` seconds (and any other
    error at once)."""
    deadline = time.monotonic() + timeout_s
    busy_ms = int(conn.execute("PRAGMA busy_timeout").fetchone()[0])
    conn.execute("PRAGMA busy_timeout=0")  # fail fast, release the read lock, retry
    try:
        while True:
            try:
                return str(conn.execute("PRAGMA journal_mode=WAL").fetchone()[0])
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
            pause(RETRY_S)
    finally:
        conn.execute(f"PRAGMA busy_timeout={busy_ms}")
