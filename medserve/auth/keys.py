"""API keys: created once, shown once, stored only as a hash.

A key reads ``ms-<id>_<secret>``: the id (12 hex digits) finds the row, the secret (32
random bytes, base64url) is checked against its SHA-256 with a constant-time comparison.
A 256-bit random secret needs no slow hash: there is nothing to brute-force. The database
(SQLite, WAL, beside the audit log but not part of its chain) holds ids, names, roles,
model scopes, limits, expiry, revocation and whether fallback engines may answer, plus a
journal of changes that each server copies into its audit log as events. The journal is
written by triggers on the ``keys`` table (:data:`TRIGGERS`), so a hand edit of the file
is journaled as ``medserve keys`` is (SQLite has no users: the entry cannot say who).
Whoever can write the file can also drop the triggers; the file's mode (0600) is the
guard. A database made before a column existed gets it on first open
(:data:`ADDED_COLUMNS`), and the triggers too.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol

from medserve.audit.record import now
from medserve.sqlite_wal import use_wal

Role = Literal["user", "admin", "auditor"]
ROLES: tuple[Role, ...] = ("user", "admin", "auditor")
PREFIX = "ms-"

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    models TEXT NOT NULL,
    rpm INTEGER,
    tpm INTEGER,
    expires TEXT,
    created TEXT NOT NULL,
    revoked TEXT,
    secret_sha256 BLOB NOT NULL,
    fallback INTEGER NOT NULL DEFAULT 1
) STRICT;
CREATE TABLE IF NOT EXISTS journal (
    n INTEGER PRIMARY KEY,
    ts TEXT NOT NULL,
    action TEXT NOT NULL,
    key_id TEXT NOT NULL,
    details TEXT NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS audited (replica TEXT PRIMARY KEY, last INTEGER NOT NULL) STRICT;
-- `audited.replica` holds the gateway instance name (Settings.instance); the column keeps
-- its old name because renaming it would need a migration of existing key databases.
"""

COLUMNS = "id, name, role, models, rpm, tpm, expires, created, revoked, secret_sha256, fallback"


def _details(row: str) -> str:
    """SQL: the non-secret fields of key ``row`` (NEW or OLD in a trigger) as JSON."""
    return (
        f"json_object('name', {row}.name, 'role', {row}.role, 'models', json({row}.models), "
        f"'rpm', {row}.rpm, 'tpm', {row}.tpm, 'expires', {row}.expires, "
        f"'created', {row}.created, 'revoked', {row}.revoked, "
        f"'fallback', json(CASE WHEN {row}.fallback THEN 'true' ELSE 'false' END))"
    )


_WATCHED = tuple(c.strip() for c in COLUMNS.split(","))  # every column (the secret's by name)
_CHANGED = " UNION ALL ".join(f"SELECT '{c}' AS c WHERE OLD.{c} IS NOT NEW.{c}" for c in _WATCHED)
_TS = "strftime('%Y-%m-%dT%H:%M:%f000Z', 'now')"  # the form of medserve.audit.record.now
# The journal is written by the database itself: every change to `keys`, by `medserve
# keys` or by hand (`sqlite3 keys.db "UPDATE keys SET revoked = NULL"`), is journaled once
# and copied into each server's audit log. SQLite has no users: an entry cannot say who
# made the change (PostgreSQL's can). Made after ADDED_COLUMNS (they name `fallback`).
TRIGGERS = f"""
CREATE TRIGGER IF NOT EXISTS keys_journal_insert AFTER INSERT ON keys BEGIN
    INSERT INTO journal (ts, action, key_id, details)
    VALUES ({_TS}, 'key.created', NEW.id, {_details("NEW")});
END;
CREATE TRIGGER IF NOT EXISTS keys_journal_update AFTER UPDATE ON keys
WHEN {" OR ".join(f"OLD.{c} IS NOT NEW.{c}" for c in _WATCHED)} BEGIN
    INSERT INTO journal (ts, action, key_id, details)
    VALUES (
        {_TS},
        CASE WHEN OLD.revoked IS NULL AND NEW.revoked IS NOT NULL THEN 'key.revoked'
             WHEN OLD.revoked IS NOT NULL AND NEW.revoked IS NULL THEN 'key.unrevoked'
             ELSE 'key.changed' END,
        NEW.id,
        json_patch(  -- (a null in the patch leaves the key out: previous_id when set)
            {_details("NEW")},
            json_object(
                'changed', json((SELECT json_group_array(c) FROM ({_CHANGED}))),
                'previous_id', CASE WHEN OLD.id IS NOT NEW.id THEN OLD.id END
            )
        )
    );
END;
CREATE TRIGGER IF NOT EXISTS keys_journal_delete AFTER DELETE ON keys BEGIN
    INSERT INTO journal (ts, action, key_id, details)
    VALUES ({_TS}, 'key.deleted', OLD.id, {_details("OLD")});
END;
"""
# Columns added after the first release, with their definitions: a database made before
# one of them gets it on first open (:meth:`KeyStore._connect`), existing keys the default.
ADDED_COLUMNS = {"fallback": "INTEGER NOT NULL DEFAULT 1"}


class KeyStoreError(Exception):
    """A key operation cannot be done; the message says why (never a secret)."""


class KeyBackend(Protocol):
    """What the server and ``medserve keys`` need of a keys database: the SQLite
    :class:`KeyStore` or :class:`medserve.auth.pgkeys.PgKeyStore`. ``lookup`` runs on
    every request and must not block on a network."""

    def create(
        self,
        name: str,
        role: Role = "user",
        models: Sequence[str] = ("*",),
        rpm: int | None = None,
        tpm: int | None = None,
        expires: str | None = None,
        fallback: bool = True,
    ) -> tuple[Key, str]: ...

    def revoke(self, key_id: str) -> Key: ...

    def all(self) -> list[Key]: ...

    def lookup(self, key_id: str) -> tuple[Key, bytes] | None: ...

    def changes(self, instance: str) -> list[dict[str, object]]: ...

    def mark_audited(self, instance: str, copied: Sequence[int]) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Key:
    """What the server knows about a key: never its secret."""

    id: str
    name: str
    role: Role
    models: tuple[str, ...]  # ("*",) for every model
    rpm: int | None = None
    tpm: int | None = None
    expires: str | None = None
    created: str = ""
    revoked: str | None = None
    # Whether a model's fallback engines (other weights of the same checkpoint, e.g. the
    # CPU GGUF of a GPU model) may answer this key's requests (medserve.fallback).
    fallback: bool = True

    def may_use(self, model: str) -> bool:
        return "*" in self.models or model in self.models

    def expired(self, at: str | None = None) -> bool:
        return self.expires is not None and (at or now()) >= self.expires

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "name": self.name,
            "role": self.role,
            "models": list(self.models),
            "rpm": self.rpm,
            "tpm": self.tpm,
            "expires": self.expires,
            "created": self.created,
            "revoked": self.revoked,
            "fallback": self.fallback,
        }


def split(token: str) -> tuple[str, str] | None:
    """``ms-<id>_<secret>`` -> (id, secret), or None when it is not shaped like a key."""
    if not token.startswith(PREFIX) or "_" not in token:
        return None
    key_id, _, secret = token[len(PREFIX) :].partition("_")
    if not key_id or not secret or len(token) > 200:
        return None
    return key_id, secret


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def matches(secret: str, stored: bytes) -> bool:
    return hmac.compare_digest(digest(secret), stored)


def check_new_key(name: str, role: str) -> None:
    """Raise KeyStoreError unless ``role`` is one of ROLES and ``name`` has 1-100
    characters (every key store checks a new key the same way)."""
    if role not in ROLES:
        raise KeyStoreError(f"role must be one of {', '.join(ROLES)}")
    if not name.strip() or len(name) > 100:
        raise KeyStoreError("a key needs a name of 1-100 characters")


def new_secret() -> tuple[str, str]:
    """A fresh (id, secret)."""
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    return secrets.token_hex(6), secret


def parse_expiry(value: str) -> str:
    """A date or time (ISO 8601; UTC if no zone) in the stored form."""
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class KeyStore:
    """The keys database. Writes open their own short transaction; lookups share one
    read connection (a server checks a key on every request, and sees a revocation on
    the next one)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._reader: sqlite3.Connection | None = None

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _connect(self) -> sqlite3.Connection:
        if not self.path.exists():
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.path.touch(mode=0o600)
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=5)
        use_wal(conn)  # a server and a `medserve keys` command may open a new file together
        conn.executescript(SCHEMA)
        if _missing_columns(conn):
            # Another process may be migrating too: decide again inside the write lock.
            conn.execute("BEGIN IMMEDIATE")
            try:
                for name in _missing_columns(conn):
                    conn.execute(f"ALTER TABLE keys ADD COLUMN {name} {ADDED_COLUMNS[name]}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                conn.close()
                raise
        conn.executescript(TRIGGERS)
        return conn

    def create(
        self,
        name: str,
        role: Role = "user",
        models: Sequence[str] = ("*",),
        rpm: int | None = None,
        tpm: int | None = None,
        expires: str | None = None,
        fallback: bool = True,
    ) -> tuple[Key, str]:
        """A new key and its full token, which is shown once and never stored.

        ``fallback`` false: no fallback engine ever answers this key (see :class:`Key`).
        """
        check_new_key(name, role)
        key_id, secret = new_secret()
        key = Key(
            key_id, name, role, tuple(models) or ("*",), rpm, tpm, expires, now(), None, fallback
        )
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                f"INSERT INTO keys ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?)",
                (
                    key.id,
                    key.name,
                    key.role,
                    json.dumps(list(key.models)),
                    rpm,
                    tpm,
                    expires,
                    key.created,
                    digest(secret),
                    int(fallback),
                ),
            )  # journaled by the table's trigger (TRIGGERS)
            conn.execute("COMMIT")
        finally:
            conn.close()
        return key, f"{PREFIX}{key_id}_{secret}"

    def revoke(self, key_id: str) -> Key:
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            found = self._get(conn, key_id)
            if found is None:
                raise KeyStoreError(f"no key with id {key_id}")
            key = found[0]
            if key.revoked is None:
                # Journaled by the table's trigger (TRIGGERS).
                conn.execute("UPDATE keys SET revoked = ? WHERE id = ?", (now(), key_id))
            conn.execute("COMMIT")
        finally:
            conn.close()
        return key

    def all(self) -> list[Key]:
        conn = self._connect()
        try:
            rows = conn.execute(f"SELECT {COLUMNS} FROM keys ORDER BY created").fetchall()
        finally:
            conn.close()
        return [_key(row) for row in rows]

    def lookup(self, key_id: str) -> tuple[Key, bytes] | None:
        """The key and its secret's hash, or None."""
        if self._reader is None:
            self._reader = self._connect()
        return self._get(self._reader, key_id)

    def changes(self, instance: str) -> list[dict[str, object]]:
        """Journal entries gateway ``instance`` has not yet copied into its audit log."""
        conn = self._connect()
        try:
            last = conn.execute("SELECT last FROM audited WHERE replica = ?", (instance,))
            row = last.fetchone()
            rows = conn.execute(
                "SELECT n, ts, action, key_id, details FROM journal WHERE n > ? ORDER BY n",
                (row[0] if row else 0,),
            ).fetchall()
        finally:
            conn.close()
        return [
            {"n": n, "ts": ts, "action": a, "key_id": k, **json.loads(d)} for n, ts, a, k, d in rows
        ]

    def mark_audited(self, instance: str, copied: Sequence[int]) -> None:
        """Mark the journal entries ``copied`` as in ``instance``'s audit log. One mark
        per instance, the highest entry: SQLite commits one writer at a time, so entries
        commit in their order and none below the mark can appear later. The mark never
        moves back."""
        if not copied:
            return
        conn = self._connect()
        try:
            conn.execute(
                "INSERT INTO audited VALUES (?, ?) "
                "ON CONFLICT(replica) DO UPDATE SET last = max(last, excluded.last)",
                (instance, max(copied)),
            )
        finally:
            conn.close()

    @staticmethod
    def _get(conn: sqlite3.Connection, key_id: str) -> tuple[Key, bytes] | None:
        row = conn.execute(f"SELECT {COLUMNS} FROM keys WHERE id = ?", (key_id,)).fetchone()
        return None if row is None else (_key(row), bytes(row[9]))


def open_keys(target: str | Path) -> KeyBackend:
    """The keys database at ``target``: a ``postgresql://`` connection string (see
    :mod:`medserve.pgsql`) or the path of a SQLite file."""
    from medserve.pgsql import is_postgres_url

    if isinstance(target, str) and is_postgres_url(target):
        from medserve.auth.pgkeys import PgKeyStore

        return PgKeyStore(target)
    return KeyStore(Path(target))


def _missing_columns(conn: sqlite3.Connection) -> list[str]:
    """:data:`ADDED_COLUMNS` the ``keys`` table of ``conn`` lacks (an older database)."""
    have = {str(row[1]) for row in conn.execute("PRAGMA table_info(keys)")}
    return [name for name in ADDED_COLUMNS if name not in have]


def _key(row: tuple[object, ...]) -> Key:
    key_id, name, role, models, rpm, tpm, expires, created, revoked, _, fallback = row
    return Key(
        id=str(key_id),
        name=str(name),
        role=_role(role),
        models=tuple(json.loads(str(models))),
        rpm=rpm if isinstance(rpm, int) else None,
        tpm=tpm if isinstance(tpm, int) else None,
        expires=str(expires) if expires else None,
        created=str(created),
        revoked=str(revoked) if revoked else None,
        fallback=fallback != 0,
    )


def _role(value: object) -> Role:
    for role in ROLES:
        if value == role:
            return role
    return "user"
