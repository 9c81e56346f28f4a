"""The writer's one retry of a failed commit (medserve.audit.writer.ChainWriter._retry),
shared by both stores, on the SQLite store with a commit fault injected.

The injected faults are the three a connection can meet at commit time: it fails before
the commit reaches the log (a connection that died while idle: retried once on a new
connection, written), the commit lands but its acknowledgement is lost (settled as written
from the re-read head: no duplicate, no fork), and a fault that persists (lost, reported,
as before: one retry, not more). The PostgreSQL store meets the first for real in
tests/postgres/test_restart.py; persistent SQLite faults are in test_audit_faults.py.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medserve.audit import AuditWriteError, EventFacts, SQLiteStore
from medserve.audit.keys import ChainKeys
from medserve.audit.verify import verify
from medserve.audit.writer import Row

KEYS = ChainKeys.from_secret(bytes(range(32)))
SIGNER = Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))


class Faulty(SQLiteStore):
    """A store whose next ``faults`` commits meet ``fault``: ``before`` (nothing written)
    or ``after`` (written, then the error)."""

    fault = "before"
    faults = 0

    def _commit(self, rows: Sequence[Row]) -> None:
        if self.faults and self.fault == "before":
            self.faults -= 1
            raise AuditWriteError("OperationalError")
        super()._commit(rows)
        if self.faults and self.fault == "after":
            self.faults -= 1
            raise AuditWriteError("OperationalError")


def seqs(path: Path) -> list[int]:
    conn = sqlite3.connect(path)
    try:
        return [int(r[0]) for r in conn.execute("SELECT seq FROM records ORDER BY seq")]
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("fault", "faults", "written", "failed"),
    [
        ("before", 1, True, 0),  # a dead connection: the retry on a new one writes it
        ("after", 1, True, 0),  # committed, acknowledgement lost: settled, not rewritten
        ("before", 2, False, 1),  # the retry fails too: lost and reported, no third try
    ],
)
def test_a_failed_commit_is_retried_once_or_settled(
    tmp_path: Path, fault: str, faults: int, written: bool, failed: int
) -> None:
    path = tmp_path / "audit.db"
    store = Faulty(path, KEYS, SIGNER)
    store.open()
    try:
        assert asyncio.run(store.append(EventFacts("first"))) == 1
        store.fault, store.faults = fault, faults
        if written:
            assert asyncio.run(store.append(EventFacts("second"))) == 2
        else:
            with pytest.raises(AuditWriteError):
                asyncio.run(store.append(EventFacts("second")))
        assert store.faults == 0  # every injected fault was met: one retry, no more
        assert store.stats.failed == failed and store.available() is written
        assert asyncio.run(store.append(EventFacts("third"))) == (3 if written else 2)
    finally:
        store.close()
    assert seqs(path) == ([1, 2, 3] if written else [1, 2])
    assert verify(path, KEYS, SIGNER.public_key()).ok


def test_a_failed_checkpoint_is_retried_once(tmp_path: Path) -> None:
    class FaultyCheckpoint(SQLiteStore):
        faults = 0

        def _sign_checkpoint(self, seq: int, hash_hex: str) -> tuple[bytes, bytes]:
            if self.faults:
                self.faults -= 1
                raise AuditWriteError("OperationalError")
            return super()._sign_checkpoint(seq, hash_hex)

    path = tmp_path / "audit.db"
    store = FaultyCheckpoint(path, KEYS, SIGNER)
    store.open()
    try:
        asyncio.run(store.append(EventFacts("first")))
        store.faults = 1
    finally:
        store.close()  # the final checkpoint: failed once, signed on the retry
    assert store.faults == 0 and store.stats.checkpoints == 1
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT max(seq) FROM checkpoints").fetchone() == (1,)
    finally:
        conn.close()
