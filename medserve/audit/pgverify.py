"""Verify the PostgreSQL audit log: every instance's chain, and every signed checkpoint.

The same walk as :mod:`medserve.audit.verify`, once per instance chain (records keyed
``(instance, seq)``; :mod:`medserve.audit.pgstore` explains the design), naming the first
bad record of the first damaged instance and the kind of damage: ``altered``, ``deleted``,
``reordered``, ``truncated`` (a signed checkpoint, its own or a peer's, vouches for records
past the end of a chain), ``bad_checkpoint``, ``wrong_key``, and ``removed``: a signed
checkpoint (a peer's, or one exported to a file) names an instance whose chain and
registration are gone from the database. Reading needs SELECT only (the auditor role).

When the keys live in the same database (``auth_journal``), verify also notes the key
changes that reach no instance's audit log (:func:`_key_journal`): a note, not damage, as
an entry made in the last seconds has not been copied yet.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from medserve import pgsql
from medserve.audit import record
from medserve.audit.keys import ChainKeys, signature_valid
from medserve.audit.pgstore import instance_genesis, read_checkpoints
from medserve.audit.verify import Problem, Verification, check_row

if TYPE_CHECKING:
    import psycopg

TS_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # medserve.audit.record.now's


@dataclass
class _Vouched:
    """What valid signed checkpoints say: (instance, seq) -> hash hex, and instances that
    some checkpoint names (existed, whatever else is gone)."""

    heads: dict[tuple[str, int], str] = field(default_factory=dict)
    named: dict[str, str] = field(default_factory=dict)  # instance -> who named it


def verify(
    url: str,
    keys: ChainKeys,
    public_key: Ed25519PublicKey | None,
    external: list[dict[str, Any]] | None = None,
) -> Verification:
    """Verify the log in the database at ``url`` (read-only). Raises
    ``pgsql.DatabaseError`` when the database cannot be read."""
    import psycopg

    result = Verification()
    conn = pgsql.connect(url)
    try:
        conn.read_only = True
        try:
            registered = {
                str(name): str(key_id)
                for name, key_id in conn.execute(
                    "SELECT instance, key_id FROM audit_instances"
                ).fetchall()
            }
            wrong = sorted(i for i, k in registered.items() if k != keys.key_id)
            if wrong:
                result.problem = Problem(
                    0,
                    "wrong_key",
                    f"log written with key id {registered[wrong[0]]}, not {keys.key_id}",
                    instance=wrong[0],
                )
                return result
            vouched = _checkpoints(result, read_checkpoints(conn) + (external or []), public_key)
            copies: set[Any] = set()
            present = _walk_all(conn, keys, vouched, result, copies)
            _key_journal(conn, result, copies)
        except psycopg.Error as exc:
            raise pgsql.DatabaseError(
                f"cannot read the audit log in {pgsql.redact(url)}: {pgsql.scrub(str(exc), url)}"
            ) from None
    finally:
        conn.close()
    # Instances a signed checkpoint names that hold no record at all: cut to nothing if
    # still registered, removed if the registration went too.
    for name in sorted(set(vouched.named) - present):
        if name in registered:
            _truncated(result, name, 0, [s for n, s in vouched.heads if n == name])
            continue
        _first(
            result,
            Problem(
                1,
                "removed",
                f"instance {name!r} is gone (records and registration); a signed checkpoint "
                f"of {vouched.named[name]} names it",
                instance=name,
            ),
        )
    result.instances = len(present | set(registered))
    return result


def _first(result: Verification, problem: Problem) -> None:
    """Keep the first problem in (instance, seq) order."""
    if result.problem is None or (problem.instance or "", problem.seq) < (
        result.problem.instance or "",
        result.problem.seq,
    ):
        result.problem = problem


def _checkpoints(
    result: Verification, lines: list[dict[str, Any]], key: Ed25519PublicKey | None
) -> _Vouched:
    vouched = _Vouched()
    for line in lines:
        try:
            instance, seq, digest = str(line["instance"]), int(line["seq"]), str(line["hash"])
            peers = dict(line.get("peers") or {})
            message = record.canonical({k: v for k, v in line.items() if k != "signature"})
            signature = bytes.fromhex(str(line["signature"]))
        except (KeyError, TypeError, ValueError):
            _first(result, Problem(0, "bad_checkpoint", "a checkpoint line is malformed"))
            continue
        if key is None:
            result.unsigned_checkpoints += 1
            continue
        if not signature_valid(key, signature, message):
            _first(
                result,
                Problem(seq, "bad_checkpoint", "checkpoint signature does not verify", instance),
            )
            continue
        claims = [(instance, seq, digest)]
        for peer, head in peers.items():
            try:
                peer_seq, peer_hash = int(head[0]), str(head[1])
            except (TypeError, ValueError, IndexError):
                continue
            vouched.named.setdefault(str(peer), instance)
            if peer_seq > 0:
                claims.append((str(peer), peer_seq, peer_hash))
        for name, at, digest_hex in claims:
            if vouched.heads.get((name, at), digest_hex) != digest_hex:
                _first(
                    result, Problem(at, "bad_checkpoint", "two signed checkpoints disagree", name)
                )
            vouched.heads[(name, at)] = digest_hex
            vouched.named.setdefault(name, instance)
    if result.unsigned_checkpoints:
        result.notes.append(
            f"{result.unsigned_checkpoints} checkpoints not checked: no public key given"
        )
    result.checkpoints = len(vouched.heads)
    return vouched


def _walk_all(
    conn: psycopg.Connection,
    keys: ChainKeys,
    vouched: _Vouched,
    result: Verification,
    copies: set[Any],
) -> set[str]:
    """Walk every instance's chain; returns the instances that have records. Adds to
    ``copies`` the key journal entries the event records copy (:func:`_copy_of`)."""
    present: set[str] = set()
    with conn.cursor(name="medserve_verify") as cur:
        cur.itersize = 2000
        cur.execute(
            "SELECT instance, seq, ts, kind, body, prev_hash, hash FROM audit_records "
            "ORDER BY instance, seq"
        )
        chain: list[tuple[Any, ...]] = []
        current: str | None = None
        for row in cur:
            if row[0] != current and current is not None:
                _walk(conn, keys, current, chain, vouched, result)
                chain = []
            current = str(row[0])
            present.add(current)
            chain.append(row)
            if row[3] == "event":
                copies.update(_copy_of(bytes(row[4])))
        if current is not None:
            _walk(conn, keys, current, chain, vouched, result)
    return present


def _copy_of(body: bytes) -> list[Any]:
    """What key journal entry an event record copies: its number (``details.journal``),
    and, for records copied before they carried it, (key id, the entry's time)."""
    try:
        details = json.loads(body).get("details")
    except (ValueError, AttributeError):
        return []
    if not isinstance(details, dict):
        return []
    found: list[Any] = []
    if isinstance(details.get("journal"), int):
        found.append(details["journal"])
    if "key_id" in details and "ts" in details:
        found.append((str(details["key_id"]), str(details["ts"])))
    return found


def _key_journal(conn: psycopg.Connection, result: Verification, copies: set[Any]) -> None:
    """Note the key journal entries (``auth_journal``, when the keys live in this database
    and this role may read them) that reach no instance's audit log. A running gateway
    copies an entry within seconds; an older one missing was hidden from every log (copy
    marks added by hand) or no gateway has run since."""
    row = conn.execute(
        "SELECT CASE WHEN to_regclass('auth_journal') IS NULL THEN false "
        "ELSE has_table_privilege('auth_journal', 'SELECT') END"
    ).fetchone()
    if not row or not row[0]:
        return
    missing: list[tuple[int, str, str, str]] = []
    for n, ts, action, key_id in conn.execute(
        "SELECT n, ts, action, key_id FROM auth_journal ORDER BY n"
    ).fetchall():
        at = ts.astimezone(UTC).strftime(TS_FORMAT)
        if int(n) not in copies and (str(key_id), at) not in copies:
            missing.append((int(n), str(action), str(key_id), at))
    result.unaudited_key_changes = [n for n, *_ in missing]
    if missing:
        shown = ", ".join(f"#{n} {a} of key {k} at {t}" for n, a, k, t in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        result.notes.append(
            f"{len(missing)} key changes in the key journal reach no instance's audit log: "
            f"{shown}{more} (a running gateway copies one within seconds; an older one was "
            "hidden from every log, or no gateway has run since it was made)"
        )


def _walk(
    conn: psycopg.Connection,
    keys: ChainKeys,
    instance: str,
    rows: Iterable[tuple[Any, ...]],
    vouched: _Vouched,
    result: Verification,
) -> None:
    expected, prev = 1, instance_genesis(keys, instance)
    last = 0
    for _, seq, ts, kind, body, prev_hash, stored in rows:
        seq, body, prev_hash, stored = int(seq), bytes(body), bytes(prev_hash), bytes(stored)
        if seq != expected:
            _first(
                result,
                Problem(expected, "deleted", f"records {expected}..{seq - 1} missing", instance),
            )
            return
        problem = check_row(
            keys,
            seq,
            ts,
            kind,
            body,
            prev_hash,
            stored,
            prev,
            lambda n: _holds(conn, instance, n),
            instance,
        )
        claimed = vouched.heads.get((instance, seq))
        if problem is None and claimed is not None and claimed != stored.hex():
            problem = Problem(seq, "altered", "differs from a signed checkpoint", instance)
        if problem is not None:
            _first(result, problem)
            return
        result.records += 1
        result.heads[instance] = last = seq
        expected, prev = seq + 1, stored
    _truncated(result, instance, last, [s for n, s in vouched.heads if n == instance])


def _truncated(result: Verification, instance: str, last: int, vouched: list[int]) -> None:
    beyond = [s for s in vouched if s > last]
    if beyond:
        _first(
            result,
            Problem(
                last + 1,
                "truncated",
                f"a signed checkpoint vouches for seq {max(beyond)}; the chain ends at {last}",
                instance,
            ),
        )


def _holds(conn: psycopg.Connection, instance: str, seq: int) -> bool:
    """Whether some row of ``instance`` claims sequence number ``seq`` (only on damage)."""
    for (body,) in conn.execute(
        "SELECT body FROM audit_records WHERE instance = %s", (instance,)
    ).fetchall():
        try:
            if json.loads(bytes(body)).get("seq") == seq:
                return True
        except ValueError:
            continue
    return False
