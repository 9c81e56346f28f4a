"""Check an audit log end to end: every record's keyed hash, the chain, the checkpoints.

The walk stops at the first damage and names its sequence number and kind:

- ``altered``: a record's bytes (or its stored hash, or its indexed copies of the time
  and kind) no longer match its keyed hash, or it does not follow the record before it,
  or it differs from a signed checkpoint;
- ``deleted``: sequence numbers are missing (rows removed, or renumbered to hide it);
- ``reordered``: an intact record sits at another record's position;
- ``truncated``: a signed checkpoint vouches for records past the end of the log;
- ``bad_checkpoint``: a checkpoint's signature does not verify;
- ``wrong_key``: the log was written with another audit secret (nothing can be checked).

A log cut short after its last checkpoint cannot be told from one that simply ended: the
checkpoint interval bounds that window, and exported checkpoints kept elsewhere are what
make a truncation visible when the database's own checkpoints were removed with it.
"""

from __future__ import annotations

import hmac
import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from medserve.audit import record
from medserve.audit.keys import ChainKeys, signature_valid
from medserve.audit.store import checkpoint_message, connect, read_checkpoints

Damage = Literal[
    "altered", "deleted", "reordered", "truncated", "bad_checkpoint", "wrong_key", "removed"
]


@dataclass(frozen=True)
class Problem:
    seq: int
    kind: Damage
    detail: str
    # The gateway instance whose chain is damaged (PostgreSQL: one chain per instance);
    # None for the SQLite log's single chain.
    instance: str | None = None


@dataclass
class Verification:
    records: int = 0
    last_seq: int = 0
    checkpoints: int = 0
    unsigned_checkpoints: int = 0
    instances: int = 0  # chains checked (PostgreSQL; 0 for SQLite's single chain)
    # PostgreSQL: each instance's last good seq (``last_seq`` is SQLite's single chain's).
    heads: dict[str, int] = field(default_factory=dict)
    problem: Problem | None = None
    notes: list[str] = field(default_factory=list)
    # PostgreSQL with the keys in the same database: the key journal entries (their n)
    # that reach no instance's audit log (medserve.audit.pgverify; also in ``notes``).
    unaudited_key_changes: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ok": self.ok,
            "records": self.records,
            "checkpoints_checked": self.checkpoints,
            "notes": self.notes,
        }
        if self.instances:  # one chain per instance: one head each, no single last seq
            out["instances"] = self.instances
            out["heads"] = dict(sorted(self.heads.items()))
            out["unaudited_key_changes"] = self.unaudited_key_changes
        else:
            out["last_seq"] = self.last_seq
        if self.problem is not None:
            p = self.problem
            out["problem"] = {"seq": p.seq, "kind": p.kind, "detail": p.detail}
            if p.instance is not None:
                out["problem"]["instance"] = p.instance
        return out


def load_checkpoint_file(path: Path) -> list[dict[str, Any]]:
    """Checkpoints exported as JSON lines (``medserve audit checkpoints``)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def verify(
    db: Path,
    keys: ChainKeys,
    public_key: Ed25519PublicKey | None,
    external: list[dict[str, Any]] | None = None,
) -> Verification:
    """Verify the log in ``db`` (opened read-only). See the module docstring."""
    result = Verification()
    conn = connect(db, readonly=True)
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("key_id") not in (None, keys.key_id):
            result.problem = Problem(
                0, "wrong_key", f"log written with key id {meta.get('key_id')}, not {keys.key_id}"
            )
            return result
        vouched = _checkpoints(result, read_checkpoints(conn) + (external or []), public_key)
        _walk(conn, keys, vouched, result)
    finally:
        conn.close()
    return result


def _first(result: Verification, problem: Problem) -> None:
    """Keep the problem with the lowest sequence number."""
    if result.problem is None or problem.seq < result.problem.seq:
        result.problem = problem


def _checkpoints(
    result: Verification, lines: list[dict[str, Any]], key: Ed25519PublicKey | None
) -> dict[int, str]:
    """Signature-checked checkpoints as seq -> hash hex."""
    vouched: dict[int, str] = {}
    for line in lines:
        try:
            seq, digest = int(line["seq"]), str(line["hash"])
            message = checkpoint_message(seq, digest, str(line["ts"]), str(line["key_id"]))
            signature = bytes.fromhex(str(line["signature"]))
        except (KeyError, TypeError, ValueError):
            _first(result, Problem(0, "bad_checkpoint", "a checkpoint line is malformed"))
            continue
        if key is None:
            result.unsigned_checkpoints += 1
            continue
        if not signature_valid(key, signature, message):
            _first(result, Problem(seq, "bad_checkpoint", "checkpoint signature does not verify"))
            continue
        if vouched.get(seq, digest) != digest:
            _first(result, Problem(seq, "bad_checkpoint", "two signed checkpoints disagree"))
        vouched[seq] = digest
    if result.unsigned_checkpoints:
        result.notes.append(
            f"{result.unsigned_checkpoints} checkpoints not checked: no public key given"
        )
    result.checkpoints = len(vouched)
    return vouched


def _walk(
    conn: sqlite3.Connection, keys: ChainKeys, vouched: dict[int, str], result: Verification
) -> None:
    expected, prev = 1, record.GENESIS
    rows = conn.execute("SELECT seq, ts, kind, body, prev_hash, hash FROM records ORDER BY seq")
    for seq, ts, kind, body, prev_hash, stored in rows:
        body, prev_hash, stored = bytes(body), bytes(prev_hash), bytes(stored)
        if seq != expected:
            _first(result, Problem(expected, "deleted", f"records {expected}..{seq - 1} missing"))
            return
        problem = check_row(
            keys, seq, ts, kind, body, prev_hash, stored, prev, lambda n: _holds(conn, n)
        )
        if problem is None and seq in vouched and vouched[seq] != stored.hex():
            problem = Problem(seq, "altered", "differs from the signed checkpoint")
        if problem is not None:
            _first(result, problem)
            return
        result.records += 1
        result.last_seq = seq
        expected, prev = seq + 1, stored
    beyond = [s for s in vouched if s > result.last_seq]
    if beyond:
        _first(
            result,
            Problem(
                result.last_seq + 1,
                "truncated",
                f"a signed checkpoint vouches for seq {max(beyond)}; the log ends at "
                f"{result.last_seq}",
            ),
        )


def check_row(
    keys: ChainKeys,
    seq: int,
    ts: str,
    kind: str,
    body: bytes,
    prev_hash: bytes,
    stored: bytes,
    prev: bytes,
    holds: Callable[[int], bool],
    instance: str | None = None,
) -> Problem | None:
    """The damage at chain position ``seq`` (SQLite's one chain, or ``instance``'s on
    PostgreSQL), or None: its keyed hash, the sequence number its body claims (``holds``
    says, only on damage, whether some row of the chain claims ``seq``: then the rows were
    reordered, else one was deleted), its link to ``prev`` and its indexed time and kind."""
    if not hmac.compare_digest(keys.record_hash(prev_hash, body), stored):
        return Problem(seq, "altered", "record does not match its keyed hash", instance)
    try:
        fields = json.loads(body)
        claimed = int(fields["seq"])
    except (ValueError, KeyError, TypeError):
        return Problem(seq, "altered", "record body is not a record", instance)
    if claimed != seq:
        if holds(seq):
            return Problem(seq, "reordered", f"position {seq} holds record {claimed}", instance)
        return Problem(
            seq, "deleted", f"record {seq} is missing; record {claimed} renumbered", instance
        )
    if prev_hash != prev:
        return Problem(seq, "altered", f"record does not follow record {seq - 1}", instance)
    if fields.get("ts") != ts or fields.get("kind") != kind:
        return Problem(seq, "altered", "indexed time or kind differs from the record", instance)
    return None


def _holds(conn: sqlite3.Connection, seq: int) -> bool:
    """Whether some row's body claims sequence number ``seq`` (only run on damage)."""
    for (body,) in conn.execute("SELECT body FROM records"):
        try:
            if json.loads(bytes(body)).get("seq") == seq:
                return True
        except ValueError:
            continue
    return False
