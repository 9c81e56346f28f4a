"""Read records out of the log for auditors: a time range as JSON lines or CSV, or the tail.

Reading opens the file read-only; nothing here can change the log. Exported JSON lines
carry each record's exact fields plus its chain hashes (hex), so an export can be matched
back to the log. Captured content is only decrypted when the content key is given.
"""

from __future__ import annotations

import csv
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import fields
from typing import IO, TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag

from medserve.audit.keys import ContentCipher
from medserve.audit.record import RequestFacts

if TYPE_CHECKING:
    import psycopg

# A PostgreSQL record's place in time order: (ts, instance, seq).
PgKey = tuple[str, str, int]

CSV_COLUMNS = [
    "seq",
    "ts",
    "kind",
    "event",
    *(f.name for f in fields(RequestFacts)),
    "details",
    "hash",
]


PG_CSV_COLUMNS = ["instance_chain", *CSV_COLUMNS]


def records(
    conn: sqlite3.Connection,
    *,
    since: str | None = None,
    until: str | None = None,
    after_seq: int = 0,
    cipher: ContentCipher | None = None,
) -> Iterator[dict[str, Any]]:
    """Records in sequence order with ``since <= ts < until`` and ``seq > after_seq``."""
    query = (
        "SELECT r.seq, r.body, r.prev_hash, r.hash, c.sealed FROM records r "
        "LEFT JOIN content c ON c.seq = r.seq WHERE r.seq > ?"
    )
    args: list[Any] = [after_seq]
    if since is not None:
        query += " AND r.ts >= ?"
        args.append(since)
    if until is not None:
        query += " AND r.ts < ?"
        args.append(until)
    for seq, body, prev_hash, digest, sealed in conn.execute(query + " ORDER BY r.seq", args):
        item: dict[str, Any] = json.loads(bytes(body))
        item["seq"] = seq
        item["prev_hash"] = bytes(prev_hash).hex()
        item["hash"] = bytes(digest).hex()
        if cipher is not None and sealed is not None:
            item["content"] = _open(cipher, bytes(sealed), str(item.get("request_id")))
        yield item


def _open(cipher: ContentCipher, sealed: bytes, request_id: str) -> dict[str, Any]:
    try:
        result: dict[str, Any] = json.loads(cipher.open(sealed, request_id))
        return result
    except InvalidTag:
        return {"error": "content does not decrypt with this key, or was altered"}


def pg_records(
    conn: psycopg.Connection,
    *,
    since: str | None = None,
    until: str | None = None,
    after: PgKey | None = None,
    above: dict[str, int] | None = None,
    cipher: ContentCipher | None = None,
) -> Iterator[dict[str, Any]]:
    """PostgreSQL records (every instance's chain) in time order, then instance, then seq,
    with ``since <= ts < until``, a key after ``after``, and a seq above ``above``'s entry
    for its instance (0 when absent: the records new since :func:`pg_heads`, exactly,
    whichever order the gateways' commits came in). Each item also carries
    ``instance_chain``, the chain it belongs to (the record's own ``instance`` field is
    what the server put in it)."""
    query = (
        "SELECT r.instance, r.seq, r.ts, r.body, r.prev_hash, r.hash, c.sealed "
        "FROM audit_records r LEFT JOIN audit_content c "
        "ON c.instance = r.instance AND c.seq = r.seq WHERE true"
    )
    args: list[Any] = []
    if after is not None:
        query += " AND (r.ts, r.instance, r.seq) > (%s, %s, %s)"
        args.extend(after)
    if above is not None:
        query += " AND r.seq > coalesce((%s::jsonb ->> r.instance)::bigint, 0)"
        args.append(json.dumps(above))
    if since is not None:
        query += " AND r.ts >= %s"
        args.append(since)
    if until is not None:
        query += " AND r.ts < %s"
        args.append(until)
    query += " ORDER BY r.ts, r.instance, r.seq"
    with conn.cursor(name="medserve_export") as cur:
        cur.itersize = 2000
        cur.execute(query.encode(), args)
        for instance, seq, _ts, body, prev_hash, digest, sealed in cur:
            item: dict[str, Any] = json.loads(bytes(body))
            item["instance_chain"] = instance
            item["seq"] = seq
            item["prev_hash"] = bytes(prev_hash).hex()
            item["hash"] = bytes(digest).hex()
            if cipher is not None and sealed is not None:
                item["content"] = _open(cipher, bytes(sealed), str(item.get("request_id")))
            yield item


def pg_heads(conn: psycopg.Connection) -> dict[str, int]:
    """Every instance chain's last seq (in the transaction's snapshot)."""
    rows = conn.execute("SELECT instance, max(seq) FROM audit_records GROUP BY instance")
    return {str(name): int(seq) for name, seq in rows.fetchall()}


def pg_tail_start(conn: psycopg.Connection, lines: int) -> PgKey | None:
    """The key just before the last ``lines`` records (None: start from the first)."""
    row = conn.execute(
        "SELECT ts, instance, seq FROM audit_records ORDER BY ts DESC, instance DESC, "
        "seq DESC OFFSET %s LIMIT 1",
        (lines,),
    ).fetchone()
    return None if row is None else (str(row[0]), str(row[1]), int(row[2]))


def last_seq(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT coalesce(max(seq), 0) FROM records").fetchone()[0])


def write(
    items: Iterator[dict[str, Any]], out: IO[str], fmt: str, columns: list[str] = CSV_COLUMNS
) -> int:
    """Write ``items`` as ``jsonl`` or ``csv`` (``columns``); returns how many."""
    n = 0
    if fmt == "csv":
        writer = csv.DictWriter(out, columns, extrasaction="ignore")
        writer.writeheader()
        for item in items:
            row = dict(item)
            if "details" in row:
                row["details"] = json.dumps(row["details"], sort_keys=True)
            writer.writerow(row)
            n += 1
        return n
    for item in items:
        out.write(json.dumps(item, sort_keys=True, ensure_ascii=False) + "\n")
        n += 1
    return n
