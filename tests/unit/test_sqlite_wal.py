"""Switching a new SQLite file to WAL while another connection reads it (a server and a
`medserve keys` command opening a new keys file together: CI saw `database is locked`)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from medserve.sqlite_wal import use_wal


def reading(path: Path) -> sqlite3.Connection:
    """A connection holding a read lock on a file still in rollback-journal mode."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE IF NOT EXISTS t (x)")
    conn.execute("BEGIN")
    conn.execute("SELECT count(*) FROM t").fetchone()
    return conn


def test_the_switch_waits_for_a_reader_instead_of_failing(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    reader = reading(path)
    plain = sqlite3.connect(path, isolation_level=None, timeout=0.2)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        plain.execute("PRAGMA journal_mode=WAL")  # what medserve did: fails
    pauses: list[float] = []

    def pause(seconds: float) -> None:  # the reader finishes while the switch waits
        pauses.append(seconds)
        reader.execute("COMMIT")

    assert use_wal(plain, pause=pause) == "wal"
    assert len(pauses) == 1
    assert plain.execute("PRAGMA busy_timeout").fetchone()[0] == 200  # restored


def test_the_wait_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    reader = reading(path)
    conn = sqlite3.connect(path, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        use_wal(conn, timeout_s=0.0)
    reader.execute("COMMIT")
