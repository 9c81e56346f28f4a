"""The audit store on a log it cannot write: refused at open, recovered at run time.

Real faults only: read-only files and directories (see tests/faults.py), a path under a
regular file, a file that is not a database, and a second connection holding the write
lock. Nothing of the store is mocked.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import pytest

from medserve.audit import AuditError, AuditWriteError, EventFacts, SQLiteStore, open_store
from medserve.audit.keys import ChainKeys, load_or_create_secret
from medserve.audit.verify import verify
from medserve.config import AuditSettings
from tests.faults import read_only


def append(store: SQLiteStore, name: str = "probe") -> int:
    return asyncio.run(store.append(EventFacts(name)))


def existing_log(path: Path) -> AuditSettings:
    """A log with keys and one record, closed: what a restarted server finds."""
    conf = AuditSettings(path=path)
    store = open_store(conf)
    try:
        append(store, "server.start")
    finally:
        store.close()
    return conf


# Each case: (what is set up, the fault to hold while opening, words the message must say)
Case = Callable[[Path], tuple[AuditSettings, AbstractContextManager[object]]]


def ro_file(tmp: Path) -> tuple[AuditSettings, AbstractContextManager[object]]:
    conf = existing_log(tmp / "audit" / "audit.db")
    return conf, read_only(conf.path)


def ro_dir(tmp: Path) -> tuple[AuditSettings, AbstractContextManager[object]]:
    conf = existing_log(tmp / "audit" / "audit.db")
    return conf, read_only(conf.path.parent)


def ro_dir_new_log(tmp: Path) -> tuple[AuditSettings, AbstractContextManager[object]]:
    # Keys already there (another volume in production), no database yet.
    conf = existing_log(tmp / "audit" / "audit.db")
    for leftover in conf.path.parent.glob("audit.db*"):
        leftover.unlink()
    return conf, read_only(conf.path.parent)


def parent_is_a_file(tmp: Path) -> tuple[AuditSettings, AbstractContextManager[object]]:
    (tmp / "volume").write_text("a regular file where a directory should be\n")
    return AuditSettings(path=tmp / "volume" / "audit" / "audit.db"), nullcontext()


def not_a_database(tmp: Path) -> tuple[AuditSettings, AbstractContextManager[object]]:
    path = tmp / "audit" / "audit.db"
    path.parent.mkdir()
    path.write_bytes(b"this is not an SQLite database\n" * 200)
    return AuditSettings(path=path), nullcontext()


@pytest.mark.parametrize(
    ("setup", "names", "says"),
    [
        (ro_file, "file", "cannot be written"),
        (ro_dir, "file", "cannot open the audit log"),
        (ro_dir_new_log, "file", "cannot create the audit log"),
        (parent_is_a_file, "dir", "cannot create the audit log's directory"),
        (not_a_database, "file", "is not an SQLite audit log"),
    ],
)
def test_a_log_that_cannot_be_written_is_refused_at_open(
    tmp_path: Path, setup: Case, names: str, says: str
) -> None:
    conf, fault = setup(tmp_path)
    with fault, pytest.raises(AuditError) as caught:
        open_store(conf)
    message = str(caught.value)
    assert str(conf.path if names == "file" else conf.path.parent) in message
    assert says in message
    # And it says what to do about it.
    assert any(w in message for w in ("writable", "set audit.path", "preserve the file"))


def test_an_open_that_was_refused_succeeds_once_the_fault_is_repaired(tmp_path: Path) -> None:
    conf = existing_log(tmp_path / "audit" / "audit.db")
    with read_only(conf.path), pytest.raises(AuditError):
        open_store(conf)
    store = open_store(conf)  # the refused attempt left no lock or handle behind
    try:
        assert append(store) == 2
    finally:
        store.close()
    assert verify(conf.path, keys(conf), None).ok


def keys(conf: AuditSettings) -> ChainKeys:
    return ChainKeys.from_secret(load_or_create_secret(conf.key_path()))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    s = open_store(AuditSettings(path=tmp_path / "audit.db", busy_timeout_ms=0))
    try:
        yield s
    finally:
        s.close()


def locked(path: Path) -> sqlite3.Connection:
    """A second connection holding the write lock: the store's next commit fails."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    return conn


def test_a_failed_write_reopens_and_continues_the_chain(store: SQLiteStore) -> None:
    assert append(store) == 1
    blocker = locked(store.path)
    with pytest.raises(AuditWriteError):
        append(store)
    assert not store.available()
    with pytest.raises(AuditWriteError):  # still failing: the reopen is refused too
        append(store)
    blocker.execute("ROLLBACK")
    blocker.close()
    assert append(store) == 2  # no gap, no fork: the lost records never got a number
    assert store.available()
    assert store.stats.failed == 2


def test_recover_reopens_a_failed_log_without_a_record(store: SQLiteStore) -> None:
    append(store)
    blocker = locked(store.path)
    with pytest.raises(AuditWriteError):
        append(store)
    blocker.execute("ROLLBACK")
    blocker.close()
    store.recover()
    deadline = time.monotonic() + 30
    while not store.available():  # the writer thread reopens; no record asked it to
        assert time.monotonic() < deadline, "the store did not recover"
        time.sleep(0.01)
    assert store.stats.failed == 1 and store.stats.written == 1
    assert append(store) == 2
    conn = sqlite3.connect(store.path)
    (probe,) = conn.execute("SELECT value FROM meta WHERE key = 'writable_at'").fetchone()
    conn.close()
    assert probe  # the reopen proved the file writable with a commit of its own


def test_a_log_that_lost_committed_records_is_not_continued(store: SQLiteStore) -> None:
    for _ in range(3):
        append(store)
    blocker = locked(store.path)
    with pytest.raises(AuditWriteError):
        append(store)
    # While the writer is failing, someone with write access removes its last record.
    blocker.execute("DROP TRIGGER records_append_only_d")
    blocker.execute("DELETE FROM records WHERE seq = 3")
    blocker.execute("COMMIT")
    blocker.close()
    # Writing seq 3 again would fork the chain: the store stays failed instead.
    with pytest.raises(AuditWriteError):
        append(store)
    assert not store.available()
