"""What every PostgreSQL store of medserve shares: connecting, hiding the password, and
versioned schemas applied by migrations.

Driver: psycopg 3 (the ``postgres`` extra), chosen over asyncpg because the audit store
writes from a thread of its own (group commit, as the SQLite store does) and psycopg's
synchronous API fits that thread without an event loop of its own; it has pipeline mode
and COPY for batches, psycopg_pool for the stores that serve requests from the event loop,
and is libpq underneath, so every libpq connection option (``sslmode``, ``sslrootcert``,
``target_session_attrs``, ...) passes through the URL unchanged.

Connection strings are ``postgresql://user:password@host:port/dbname?sslmode=verify-full``
(or a unix socket: ``?host=/run/postgresql``). The password is a secret: settings hold the
URL as a ``SecretStr``, :func:`redact` is what any message shows, and :func:`scrub` removes
it from a driver's error text before that text goes anywhere.

Schemas. Each store (``component``: ``audit``, ``keys``, ...) owns its tables and a row in
``schema_version``; its migrations are a list of SQL scripts, the N-th bringing the schema
to version N. :func:`migrate` applies the pending ones in one transaction, serialised by an
advisory lock (several gateways starting at once apply them once), and re-applies the
grants each time. It raises :class:`SchemaError`, saying what to do, when the database's
schema is newer than this medserve knows, or is behind and the role cannot change it
(a gateway role, by design: migrations run as the owner role, ``medserve audit migrate``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    import psycopg

CONNECT_TIMEOUT_S = 10  # libpq's connect_timeout (its default is to wait forever)
MIGRATE_LOCK = 0x6D656473  # "meds": the advisory lock that serialises migrations
VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    component text PRIMARY KEY,
    version integer NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class DatabaseError(Exception):
    """A PostgreSQL database cannot be used; the message says what to fix, never the
    password."""


class SchemaError(DatabaseError):
    """The schema is newer than this medserve, or behind and this role cannot migrate."""


def is_postgres_url(value: str) -> bool:
    return value.startswith(("postgresql://", "postgres://"))


def redact(url: str) -> str:
    """``url`` with its password (in the authority or a ``password=`` parameter) as ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "postgresql://(unparseable URL)"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        netloc = f"{userinfo}@{host}"
    query = re.sub(r"(?i)(^|&)(password)=[^&]*", r"\1\2=***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def host_of(url: str) -> str:
    """Where ``url`` connects: ``host:port`` (port 5432 unless given), or ``local socket``
    (no host, or a ``host=`` parameter naming a directory). For ``doctor``: libpq connects
    from C, outside the egress guard, so these hosts are listed beside what it allows."""
    try:
        parts = urlsplit(url)
        port = parts.port or 5432
    except ValueError:
        return "(unparseable URL)"
    query_host = re.search(r"(?i)(?:^|&)host=([^&]*)", parts.query)
    host = parts.hostname or (query_host.group(1) if query_host else "")
    if not host or host.startswith(("/", "%2F", "%2f")):
        return "local socket"
    return f"{host}:{port}"


def password_of(url: str) -> str | None:
    """The password in ``url`` (authority or ``password=``), as written (maybe encoded)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.password:
        return parts.password
    found = re.search(r"(?i)(?:^|&)password=([^&]*)", parts.query)
    return found.group(1) if found else None


def scrub(text: str, url: str) -> str:
    """``text`` (a driver's error message) without the password of ``url``, in any form."""
    from urllib.parse import unquote

    secret = password_of(url)
    if secret:
        for form in {secret, unquote(secret)}:
            if form:
                text = text.replace(form, "***")
    return text


def connect(
    url: str, *, autocommit: bool = False, connect_timeout_s: int = CONNECT_TIMEOUT_S
) -> psycopg.Connection:
    """A connection to ``url``; :class:`DatabaseError` naming the redacted URL and the
    driver's reason (scrubbed) when it cannot be made."""
    import psycopg

    try:
        return psycopg.connect(url, autocommit=autocommit, connect_timeout=connect_timeout_s)
    except psycopg.Error as exc:
        reason = scrub(str(exc).strip(), url)
        raise DatabaseError(f"cannot connect to {redact(url)}: {reason}") from None


def migrate(
    conn: psycopg.Connection,
    component: str,
    migrations: Sequence[str],
    grants: Callable[[psycopg.Connection], None] | None = None,
    *,
    url: str = "",
    migrate_hint: str = "",
) -> int:
    """Bring ``component``'s schema to ``len(migrations)``; returns the version it is at.

    ``conn`` must not be in a transaction. ``grants`` runs after the migrations (in the same
    transaction) when this role could apply them, i.e. owns the schema. Raises
    :class:`SchemaError` (newer schema, or pending migrations this role may not apply:
    ``migrate_hint`` says how to apply them) or :class:`DatabaseError`.
    """
    import psycopg

    target = len(migrations)
    try:
        current = _version(conn, component)
        conn.rollback()
    except psycopg.errors.UndefinedTable:
        conn.rollback()
        current = 0
    except psycopg.Error as exc:
        conn.rollback()
        raise DatabaseError(f"cannot read the schema version: {scrub(str(exc), url)}") from None
    if current > target:
        raise SchemaError(
            f"the database's {component} schema is version {current}; this medserve knows "
            f"versions up to {target}: upgrade medserve (never downgrade against a migrated "
            "database)"
        )
    if current == target and grants is None:
        conn.rollback()
        return current
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
            conn.execute(VERSION_TABLE)
            current = _version(conn, component)  # another gateway may have migrated meanwhile
            if current > target:
                raise SchemaError(f"the database's {component} schema is version {current}")
            for version in range(current + 1, target + 1):
                conn.execute(migrations[version - 1].encode())
                conn.execute(
                    "INSERT INTO schema_version (component, version) VALUES (%s, %s) "
                    "ON CONFLICT (component) DO UPDATE SET version = excluded.version, "
                    "applied_at = now()",
                    (component, version),
                )
            if grants is not None:
                grants(conn)
    except psycopg.errors.InsufficientPrivilege:
        if current == target:  # up to date; re-granting is the owner's business
            return current
        raise SchemaError(
            f"the database's {component} schema is at version {current} and this medserve "
            f"needs {target}, but the role it logs in as may not change the schema: "
            f"{migrate_hint or 'apply the migrations as the owner role'}"
        ) from None
    except psycopg.Error as exc:
        raise DatabaseError(
            f"migrating the {component} schema failed: {scrub(str(exc), url)}"
        ) from None
    return target


def _version(conn: psycopg.Connection, component: str) -> int:
    row = conn.execute(
        "SELECT version FROM schema_version WHERE component = %s", (component,)
    ).fetchone()
    return int(row[0]) if row else 0


def role_exists(conn: psycopg.Connection, role: str) -> bool:
    row = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
    return row is not None


def grant(conn: psycopg.Connection, privileges: str, tables: Sequence[str], role: str) -> None:
    """``GRANT privileges ON tables TO role`` (names quoted), if the role exists."""
    from psycopg import sql

    if not role_exists(conn, role):
        return
    query = sql.SQL("GRANT {} ON {} TO {}").format(
        sql.SQL(privileges),
        sql.SQL(", ").join(sql.Identifier(t) for t in tables),
        sql.Identifier(role),
    )
    conn.execute(query)


def rows(conn: psycopg.Connection, query: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """All rows of ``query`` (a typed shorthand)."""
    return list(conn.execute(query.encode(), args).fetchall())
