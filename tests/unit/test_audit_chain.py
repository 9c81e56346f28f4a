"""The audit chain catches each kind of damage, at the right sequence number.

Each case builds a real log (SQLite file, real keys), damages it the way an intruder with
write access to the file would (dropping the append-only triggers first), and checks that
`verify` names the first bad record and the kind of damage.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from medserve.audit import EventFacts, RequestFacts, open_store
from medserve.audit.keys import ChainKeys, load_or_create_secret, load_public_key
from medserve.audit.record import GENESIS
from medserve.audit.store import AuditError, AuditWriteError, SQLiteStore, read_checkpoints
from medserve.audit.verify import Verification, verify
from medserve.config import AuditSettings

N = 20  # records in each log
EVERY = 5  # checkpoint interval


@dataclass
class Log:
    conf: AuditSettings
    keys: ChainKeys
    external: list[dict[str, object]]  # checkpoints exported before the damage

    @property
    def db(self) -> Path:
        return self.conf.path

    def verify(self, external: bool = True) -> Verification:
        public = load_public_key(self.conf.signing_key_path().with_suffix(".pub"))
        return verify(self.db, self.keys, public, self.external if external else None)

    def tamper(self, *statements: str, args: tuple[object, ...] = ()) -> None:
        conn = sqlite3.connect(self.db, isolation_level=None)
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'"):
            conn.execute(f"DROP TRIGGER {name}")
        for sql in statements:
            conn.execute(sql, args if "?" in sql else ())
        conn.close()


def facts(i: int) -> RequestFacts:
    return RequestFacts(
        request_id=f"req-{i}",
        method="POST",
        endpoint="/v1/chat/completions",
        status=200,
        model="fake-echo",
        prompt_tokens=i,
        completion_tokens=2 * i,
        prompt_hmac="ab" * 32,
    )


def write(store: SQLiteStore, items: list[RequestFacts | EventFacts]) -> list[int]:
    async def go() -> list[int]:
        return list(await asyncio.gather(*(store.append(f) for f in items)))

    return asyncio.run(go())


@pytest.fixture
def log(tmp_path: Path) -> Log:
    conf = AuditSettings(path=tmp_path / "audit.db", checkpoint_every=EVERY)
    store = open_store(conf)
    try:
        write(store, [EventFacts("server.start", details={"version": "test"})])
        for i in range(2, N + 1):  # one commit each: a checkpoint every EVERY records
            write(store, [facts(i)])
    finally:
        store.close()
    conn = sqlite3.connect(conf.path)
    external = read_checkpoints(conn)
    conn.close()
    keys = ChainKeys.from_secret(load_or_create_secret(conf.key_path()))
    return Log(conf, keys, external)


def flip_body_byte(log: Log) -> None:
    log.tamper(
        "UPDATE records SET body = CAST(replace(CAST(body AS TEXT), '\"status\":200', "
        "'\"status\":201') AS BLOB) WHERE seq = 7"
    )


def flip_hash(log: Log) -> None:
    conn = sqlite3.connect(log.db)
    digest = bytearray(conn.execute("SELECT hash FROM records WHERE seq = 3").fetchone()[0])
    conn.close()
    digest[0] ^= 1
    log.tamper("UPDATE records SET hash = ? WHERE seq = 3", args=(bytes(digest),))


def delete_row(log: Log) -> None:
    log.tamper("DELETE FROM records WHERE seq = 9")


def delete_and_renumber(log: Log) -> None:
    log.tamper(
        "DELETE FROM records WHERE seq = 9",
        "UPDATE records SET seq = -(seq - 1) WHERE seq > 9",
        "UPDATE records SET seq = -seq WHERE seq < 0",
    )


def swap_rows(log: Log) -> None:
    log.tamper(
        "UPDATE records SET seq = -1 WHERE seq = 12",
        "UPDATE records SET seq = 12 WHERE seq = 13",
        "UPDATE records SET seq = 13 WHERE seq = -1",
    )


def truncate_everything_after(log: Log) -> None:
    # The intruder removes the tail and the database's own checkpoints of it; only the
    # exported checkpoints still vouch for it.
    log.tamper("DELETE FROM records WHERE seq > 12", "DELETE FROM checkpoints WHERE seq > 12")


def truncate_records_only(log: Log) -> None:
    log.tamper("DELETE FROM records WHERE seq > 12")


def forge_without_key(log: Log) -> None:
    """Rewrite record 4 and re-chain everything after it, with a key of the intruder's."""
    wrong = ChainKeys.from_secret(b"\x01" * 32)
    conn = sqlite3.connect(log.db, isolation_level=None)
    query = "SELECT seq, body, prev_hash FROM records WHERE seq >= 4 ORDER BY seq"
    rows = conn.execute(query).fetchall()
    conn.close()
    prev = None
    statements = []
    for seq, body, prev_hash in rows:
        if seq == 4:
            doc = json.loads(body)
            doc["status"] = 500
            body = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        prev = prev_hash if prev is None else prev
        digest = wrong.record_hash(prev, body)
        statements.append((seq, body, prev, digest))
        prev = digest
    log.tamper()
    conn = sqlite3.connect(log.db, isolation_level=None)
    conn.executemany(
        "UPDATE records SET body = ?, prev_hash = ?, hash = ? WHERE seq = ?",
        [(b, p, d, s) for s, b, p, d in statements],
    )
    conn.close()


def bad_signature(log: Log) -> None:
    line = dict(log.external[1])
    sig = bytearray(bytes.fromhex(str(line["signature"])))
    sig[5] ^= 0xFF
    line["signature"] = bytes(sig).hex()
    log.external[1] = line


CASES: list[tuple[str, Callable[[Log], None], int, str]] = [
    ("byte flip in a record", flip_body_byte, 7, "altered"),
    ("byte flip in a stored hash", flip_hash, 3, "altered"),
    ("deleted row", delete_row, 9, "deleted"),
    ("deleted row, later rows renumbered", delete_and_renumber, 9, "deleted"),
    ("swapped rows", swap_rows, 12, "reordered"),
    ("truncated, checkpoints too", truncate_everything_after, 13, "truncated"),
    ("truncated records", truncate_records_only, 13, "truncated"),
    ("forged and re-chained without the key", forge_without_key, 4, "altered"),
    ("checkpoint signature altered", bad_signature, 10, "bad_checkpoint"),
]


def test_an_untouched_log_verifies(log: Log) -> None:
    result = log.verify()
    assert result.ok, result.problem
    assert (result.records, result.last_seq) == (N, N)
    assert result.checkpoints == N // EVERY


@pytest.mark.parametrize(
    ("damage", "seq", "kind"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_damage_is_found_at_its_sequence_number(
    log: Log, damage: Callable[[Log], None], seq: int, kind: str
) -> None:
    damage(log)
    result = log.verify()
    assert result.problem is not None
    assert (result.problem.seq, result.problem.kind) == (seq, kind), result.problem


def test_truncation_needs_a_checkpoint_to_be_seen(log: Log) -> None:
    truncate_everything_after(log)
    # Without the exported checkpoints, a cut at a checkpoint looks like a log that ended:
    # the documented limit, and the reason to keep checkpoints elsewhere.
    assert log.verify(external=False).ok
    assert not log.verify(external=True).ok


def test_a_log_written_with_another_secret_is_named_as_such(log: Log) -> None:
    result = verify(log.db, ChainKeys.from_secret(b"\x02" * 32), None)
    assert result.problem is not None and result.problem.kind == "wrong_key"


def test_the_database_refuses_updates_and_deletes(log: Log) -> None:
    conn = sqlite3.connect(log.db)
    for sql in ("DELETE FROM records WHERE seq = 1", "UPDATE records SET ts = 'x'"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute(sql)
    conn.close()


def test_reopening_continues_the_chain(log: Log) -> None:
    store = open_store(log.conf)
    try:
        assert write(store, [facts(100)]) == [N + 1]
    finally:
        store.close()
    result = log.verify()
    assert result.ok and result.last_seq == N + 1


def test_reopening_with_another_secret_is_refused(log: Log) -> None:
    log.conf.key_path().write_text("03" * 32)
    with pytest.raises(AuditError, match="does not match"):
        open_store(log.conf)


def test_reopening_a_log_with_a_damaged_head_is_refused(log: Log) -> None:
    log.tamper(f"UPDATE records SET body = CAST('{{}}' AS BLOB) WHERE seq = {N}")
    with pytest.raises(AuditError, match=f"seq {N}"):
        open_store(log.conf)


def test_a_second_writer_is_refused(log: Log) -> None:
    store = open_store(log.conf)
    try:
        with pytest.raises(AuditError, match="another process"):
            open_store(log.conf)
    finally:
        store.close()


def test_a_failed_write_is_reported_and_the_chain_survives_it(log: Log) -> None:
    store = open_store(log.conf.model_copy(update={"busy_timeout_ms": 0, "retry_after_s": 60}))
    blocker = sqlite3.connect(log.db, isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        with pytest.raises(AuditWriteError):
            write(store, [facts(200)])
        assert not store.available()  # callers fail fast while the log is failing
        assert store.stats.failed == 1
        blocker.execute("ROLLBACK")
        assert write(store, [facts(201)]) == [N + 1]  # the lost record took no number
    finally:
        blocker.close()
        store.close()
    assert log.verify().ok


def test_genesis_links_the_first_record(log: Log) -> None:
    conn = sqlite3.connect(log.db)
    assert conn.execute("SELECT prev_hash FROM records WHERE seq = 1").fetchone()[0] == GENESIS
    conn.close()


class _OlderFacts(RequestFacts):
    """A request record as written before the structured-answer fields existed."""

    def fields(self) -> dict[str, object]:
        new = {"constraint", "schema_sha256", "tools"}
        return {k: v for k, v in super().fields().items() if k not in new}


def test_records_from_before_the_structured_answer_fields_still_verify(tmp_path: Path) -> None:
    """Verification reads the stored bytes, never re-serialises: a log whose older records
    lack `constraint`, `schema_sha256` and `tools` verifies before and after newer ones."""
    conf = AuditSettings(path=tmp_path / "audit.db", checkpoint_every=EVERY)
    store = open_store(conf)
    try:
        write(store, [_OlderFacts("old-1", "POST", "/v1/chat/completions", 200)])
        write(store, [RequestFacts("new", "POST", "/v1/chat/completions", 200, constraint="tool")])
        write(store, [_OlderFacts("old-2", "POST", "/v1/chat/completions", 200)])
    finally:
        store.close()
    conn = sqlite3.connect(conf.path)
    bodies = [json.loads(b) for (b,) in conn.execute("SELECT body FROM records ORDER BY seq")]
    conn.close()
    requests = [b for b in bodies if b["kind"] == "request"]
    assert ["constraint" in b for b in requests] == [False, True, False]
    keys = ChainKeys.from_secret(load_or_create_secret(conf.key_path()))
    public = load_public_key(conf.signing_key_path().with_suffix(".pub"))
    assert verify(conf.path, keys, public).ok


def test_a_checkpoint_file_that_cannot_be_written_refuses_the_start(tmp_path: Path) -> None:
    target = tmp_path / "missing" / "checkpoints.jsonl"
    conf = AuditSettings(path=tmp_path / "audit.db", checkpoint_file=target)
    with pytest.raises(AuditError, match=r"cannot write the audit checkpoint file .*missing"):
        open_store(conf)
    target.parent.mkdir()
    open_store(conf).close()  # the refused start released the log (its lock) on the way out
    assert target.read_text(encoding="utf-8") == ""  # closed with no record: no checkpoint


def test_a_log_behind_its_checkpoint_file_refuses_to_continue(tmp_path: Path) -> None:
    """A log restored from an older backup would reuse sequence numbers that checkpoints
    kept elsewhere already vouch for: the server refuses to start on it."""
    kept = tmp_path / "kept" / "checkpoints.jsonl"
    kept.parent.mkdir()
    conf = AuditSettings(path=tmp_path / "audit.db", checkpoint_file=kept)
    backup = tmp_path / "backup.db"
    for round_ in range(2):
        store = open_store(conf)
        write(store, [facts(i) for i in range(5)])
        store.close()  # a checkpoint at close: 5, then 10
        if round_ == 0:
            backup.write_bytes(conf.path.read_bytes())
    conf.path.write_bytes(backup.read_bytes())  # the restore
    with pytest.raises(AuditError, match=r"ends at seq 5, but the checkpoint file .* seq 10"):
        open_store(conf)
    kept.rename(kept.with_suffix(".old"))  # a new log, on purpose
    open_store(conf).close()
