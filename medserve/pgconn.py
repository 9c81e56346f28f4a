"""PostgreSQL connection strings: which settings name one, what of one may be shown, and
the options medserve adds when it connects.

A connection string (``postgresql://user:password@host:5432/db?sslmode=verify-full`` or
libpq's ``key=value`` form) may carry a password. It is never logged, never put in an
error message, an audit record or ``/ready``: :func:`display` is the only form shown
(user, host, port, database and ``sslmode``, never the password), and :func:`scrub`
removes the password from any text before it is shown (a driver's message could quote
it). Keeping the password out of the string altogether is better still: libpq reads
``PGPASSWORD`` and ``~/.pgpass`` (mode 0600) when the string has none.

TLS to the database is libpq's: ``sslmode`` (``disable`` … ``verify-full``),
``sslrootcert``, ``sslcert`` and ``sslkey`` pass through the string unchanged.

This module imports psycopg only inside its functions, so SQLite-only installs never
need it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

SCHEMES = ("postgresql://", "postgres://")
# Seconds libpq waits for a connection before giving up (its default is forever); a
# string that sets connect_timeout itself keeps its own.
CONNECT_TIMEOUT_S = 5
APPLICATION_NAME = "medserve"
SHOWN = ("user", "host", "port", "dbname", "sslmode")


def is_postgres(target: str) -> bool:
    """True when ``target`` is a PostgreSQL connection URL rather than a file path."""
    return target.startswith(SCHEMES)


def _parts(url: str) -> dict[str, str]:
    from psycopg.conninfo import conninfo_to_dict

    return {k: str(v) for k, v in conninfo_to_dict(url).items() if v is not None}


def display(url: str) -> str:
    """The string as it may be shown: ``postgresql://user@host:port/db?sslmode=…``, no
    password. A string libpq cannot parse shows as ``postgresql://(unparsable)``."""
    try:
        parts = _parts(url)
    except Exception:  # psycopg.ProgrammingError; its message would quote the string
        return "postgresql://(unparsable)"
    user = f"{quote(parts['user'], safe='')}@" if "user" in parts else ""
    host = parts.get("host", "")
    host = quote(host, safe="") if host.startswith("/") else host  # a socket directory
    port = f":{parts['port']}" if "port" in parts else ""
    db = f"/{quote(parts['dbname'], safe='')}" if "dbname" in parts else ""
    mode = f"?sslmode={parts['sslmode']}" if "sslmode" in parts else ""
    return f"postgresql://{user}{host}{port}{db}{mode}"


def password(url: str) -> str | None:
    """The password the string carries, if any (to :func:`scrub` it from text)."""
    try:
        return _parts(url).get("password") or None
    except Exception:
        return None


def scrub(text: str, url: str) -> str:
    """``text`` with the string's password (as written and URL-encoded) replaced by
    ``***``; a string libpq cannot parse replaces the whole string."""
    secret = password(url)
    if secret is None:
        return text.replace(url, "***") if url and not _parses(url) else text
    for form in {secret, quote(secret, safe=""), quote(secret)}:
        text = text.replace(form, "***")
    return text


def _parses(url: str) -> bool:
    try:
        _parts(url)
    except Exception:
        return False
    return True


def connect_options(url: str) -> dict[str, Any]:
    """Keyword arguments for ``psycopg.connect(url, **…)``: a connect timeout and the
    application name (seen in ``pg_stat_activity``) unless the string sets them."""
    parts = _parts(url)
    options: dict[str, Any] = {}
    if "connect_timeout" not in parts:
        options["connect_timeout"] = CONNECT_TIMEOUT_S
    if "application_name" not in parts:
        options["application_name"] = APPLICATION_NAME
    return options


class SchemaError(Exception):
    """The database's schema is not one this medserve can use; the message says why."""


def schema_version(conn: Any, table: str) -> int | None:
    """The version recorded in ``table`` (one row, one ``version`` column), or None when
    the table does not exist yet (a fresh database). ``conn``: a psycopg connection."""
    exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
    if not exists or not exists[0]:
        return None
    row = conn.execute(f"SELECT max(version) FROM {table}").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def migrate(conn: Any, table: str, migrations: tuple[str, ...], what: str) -> int:
    """Bring the schema that ``table`` versions up to ``len(migrations)`` and return it.

    ``migrations[i]`` takes the schema from version ``i`` to ``i + 1`` (SQL, one or more
    statements). All pending ones run in one transaction under an advisory lock, so
    several gateways starting at once migrate once and the others wait, then see it
    done. A database at a newer version than this medserve knows raises
    :class:`SchemaError` (never downgraded); ``what`` names the schema in messages.
    ``conn``: a psycopg connection in autocommit mode.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (table,))
        current = schema_version(conn, table)
        if current is None:
            conn.execute(f"CREATE TABLE {table} (version integer NOT NULL)")
            conn.execute(f"INSERT INTO {table} VALUES (0)")
            current = 0
        if current > len(migrations):
            raise SchemaError(
                f"the {what} schema is at version {current}, newer than this medserve knows "
                f"({len(migrations)}): upgrade medserve"
            )
        for step in migrations[current:]:
            conn.execute(step)
        if current < len(migrations):
            conn.execute(f"UPDATE {table} SET version = %s", (len(migrations),))
    return len(migrations)
