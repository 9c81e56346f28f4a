"""Group commit on the real SQLite store: records that arrive while a commit is under way
share the next one (one fsync for many, no linger), and each append returns only once
its record is committed, in chain order, and the chain verifies."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

from medserve.audit import RequestFacts, open_store
from medserve.audit.keys import load_public_key
from medserve.audit.verify import verify
from medserve.config import AuditSettings

WAIT_S = 30.0  # bound on every wait for a condition
CONCURRENT = 64


def facts(i: int) -> RequestFacts:
    return RequestFacts(
        request_id=f"{i:032x}", method="POST", endpoint="/v1/chat/completions", status=200
    )


def test_records_arriving_during_a_commit_share_the_next_and_are_durable_on_return(
    tmp_path: Path,
) -> None:
    conf = AuditSettings(path=tmp_path / "audit.db")
    store = open_store(conf)
    release, commits = threading.Event(), []

    def on_commit(seconds: float) -> None:  # the writer thread, after each commit
        commits.append(seconds)
        if len(commits) == 1:
            release.wait(WAIT_S)  # the first commit holds the writer until all are queued

    store.on_commit = on_commit
    reader = sqlite3.connect(f"{conf.path.resolve().as_uri()}?mode=ro", uri=True)

    async def one(i: int) -> int:
        seq = await store.append(facts(i))
        # Returned: committed, so another connection sees the record.
        row = reader.execute("SELECT body FROM records WHERE seq = ?", (seq,)).fetchone()
        assert row is not None and f"{i:032x}".encode() in row[0]
        return seq

    async def run() -> list[int]:
        tasks = [asyncio.create_task(one(i)) for i in range(CONCURRENT)]
        deadline = time.monotonic() + WAIT_S
        # Until the first commit is done and every other record waits in the queue.
        while not commits or store.stats.written + store._queue.qsize() < CONCURRENT:
            assert time.monotonic() < deadline, "records did not queue"
            await asyncio.sleep(0.01)
        assert not any(t.done() for t in tasks[1:])  # none answered before its commit
        release.set()
        return await asyncio.gather(*tasks)

    try:
        seqs = asyncio.run(run())
    finally:
        reader.close()
        store.close()
    assert sorted(seqs) == list(range(1, CONCURRENT + 1))
    assert len(commits) <= 2  # the first record's commit, then all the others in one
    public = load_public_key(conf.signing_key_path().with_suffix(".pub"))
    result = verify(conf.path, store.keys, public)
    assert result.ok and result.records == CONCURRENT
