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
from typing import IO, Any

from cryptography.exceptions import InvalidTag

from medserve.audit.keys import ContentCipher
from medserve.audit.record import RequestFacts

CSV_COLUMNS = [
    "seq",
    "ts",
    "kind",
    "event",
    *(f.name for f in fields(RequestFacts)),
    "details",
    "hash",
]


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


def last_seq(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT coalesce(max(seq), 0) FROM records").fetchone()[0])


def write(items: Iterator[dict[str, Any]], out: IO[str], fmt: str) -> int:
    """Write ``items`` as ``jsonl`` or ``csv``; returns how many."""
    n = 0
    if fmt == "csv":
        writer = csv.DictWriter(out, CSV_COLUMNS, extrasaction="ignore")
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
