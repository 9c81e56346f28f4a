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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

if TYPE_CHECKING:
    import psycopg

CONNECT_TIMEOUT_S = 10  # libpq's connect_timeout (its default is to wait forever)
# A migration's wait for a lock (another gateway migrating holds the advisory lock for the
# few milliseconds its scripts take; DDL waits for long transactions on its tables, and
# meanwhile every other session's statements on those tables queue behind it): past this,
# the start fails, saying so, rather than hang with the gateways' writes queued behind.
MIGRATE_LOCK_TIMEOUT_S = 10.0
BOUNDS = "SELECT set_config('statement_timeout', %s, false), set_config('lock_timeout', %s, false)"
MIGRATE_LOCK = 0x6D656473  # "meds": the advisory lock that serialises migrations
VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    component text PRIMARY KEY,
    version integer NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass
class Granted:
    """What the grants of a :func:`migrate` did, so that a ``migrate`` command says only
    what happened: ``lines``, one per grant made (``role: PRIVILEGES on tables``);
    ``missing``, the roles named that do not exist (nothing granted to them); ``refused``,
    true when the role migrating may not grant (it does not own the tables): nothing was
    granted at all."""

    lines: list[str] = field(default_factory=list)
    missing: set[str] = field(default_factory=set)
    refused: bool = False


class DatabaseError(Exception):
    """A PostgreSQL database cannot be used; the message says what to fix, never the
    password."""


class SchemaError(DatabaseError):
    """The schema is newer than this medserve, or behind and this role cannot migrate."""


def is_postgres_url(value: str) -> bool:
    return value.startswith(("postgresql://", "postgres://"))


_PASSWORD_PARAM = re.compile(r"(?i)([?&])(password)=([^&]*)")
# Where libpq, meeting an unescaped character it does not expect, may cut a password: the
# pieces between them can appear in its error messages, so they are scrubbed too.
_CUTS = re.compile(r"[@:/?#&,=]")
_PIECE_MIN = 4  # shorter pieces would blank ordinary words of an error message


def _userinfo(url: str) -> tuple[str, str, str] | None:
    """``(scheme://, user[:password], @rest)``, or None without an ``@``.

    The user information runs to the **last** ``@``: a password written unescaped may hold
    ``@``, ``#``, ``?`` or ``/`` (libpq accepts some of these), and whatever is taken for
    the password is hidden; a URL split too far hides a host too, never shows a secret.
    """
    start = url.find("://")
    if start < 0:
        return None
    start += 3
    at = url.rfind("@", start)
    if at < 0:
        return None
    return url[:start], url[start:at], url[at:]


def redact(url: str) -> str:
    """``url`` with its password (in the user information or a ``password=`` parameter)
    as ``***``; used for every URL medserve shows (logs, errors, ``/ready``, doctor)."""
    parts = _userinfo(url)
    if parts is not None:
        head, userinfo, rest = parts
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        url = head + userinfo + rest
    return _PASSWORD_PARAM.sub(r"\1\2=***", url)


def passwords_of(url: str) -> list[str]:
    """The passwords in ``url`` (user information, ``password=`` parameters), as written
    (maybe percent-encoded)."""
    found = []
    parts = _userinfo(url)
    if parts is not None and ":" in parts[1]:
        found.append(parts[1].split(":", 1)[1])
    found += [m.group(3) for m in _PASSWORD_PARAM.finditer(url)]
    return [f for f in found if f]


def scrub(text: str, url: str) -> str:
    """``text`` (a driver's error message) without the passwords of ``url``, in any form:
    as written, percent-decoded, and the pieces of them that a misparse would show."""
    forms = {f for secret in passwords_of(url) for f in (secret, unquote(secret))}
    forms |= {p for f in list(forms) for p in _CUTS.split(f) if len(p) >= _PIECE_MIN}
    for form in sorted(forms, key=len, reverse=True):  # whole before pieces
        text = text.replace(form, "***")
    return text


def host_of(url: str) -> str:
    """Where ``url`` connects: ``host:port`` (port 5432 unless given), or ``local socket``
    (no host, or a ``host=`` parameter naming a directory); several for a multi-host URL,
    comma-separated. For ``doctor`` and the egress guard (:func:`hosts_of`)."""
    found = hosts_of(url)
    return ", ".join(found) if found else "local socket"


def host_names(*urls: str | None) -> list[str]:
    """The network host names (or addresses) the ``urls`` name, without ports, sorted: the
    egress guard allows them as it allows vLLM replicas' hosts (psycopg resolves a name in
    Python, which the guard sees; libpq's connect itself it does not)."""
    import os

    names: set[str] = set()
    for url in urls:
        if not url:
            continue
        found = hosts_of(url)
        if not found and not re.search(r"(?i)[?&]host=", url):  # libpq falls back on PGHOST
            found = [f"{h}:" for h in os.environ.get("PGHOST", "").split(",") if h]
        names |= {h.rsplit(":", 1)[0].strip("[]") for h in found if not h.startswith("/")}
    return sorted(names)


def hosts_of(url: str) -> list[str]:
    """The network hosts ``url`` names, ``host:port`` each (none for unix sockets)."""
    parts = _userinfo(url)
    rest = parts[2][1:] if parts is not None else url.split("://", 1)[-1]
    authority = re.split(r"[/?]", rest, maxsplit=1)[0]
    query = rest.split("?", 1)[1] if "?" in rest else ""
    listed = re.search(r"(?i)(?:^|&)host=([^&]*)", query)
    ports = re.search(r"(?i)(?:^|&)port=([^&]*)", query)
    names: list[str] = []
    if authority:
        for item in authority.split(","):
            if item.startswith("["):  # [IPv6]:port
                host, _, port = item.partition("]")
                host, port = host + "]", port.removeprefix(":")
            else:
                host, _, port = item.partition(":")
            if host:
                names.append(f"{host}:{port or 5432}")
    elif listed:
        port_list = unquote(ports.group(1)).split(",") if ports else []
        for i, host in enumerate(unquote(listed.group(1)).split(",")):
            if host and not host.startswith("/"):
                port = port_list[i] if i < len(port_list) else "5432"
                names.append(f"{host}:{port}")
    return names


def bounds(statement_timeout_s: float, lock_timeout_s: float) -> tuple[str, str]:
    """:data:`BOUNDS`' arguments: the session's ``statement_timeout`` and ``lock_timeout``
    (seconds, as milliseconds; 0 is no bound). Set once when a connection is configured,
    so every later statement of the session is bounded without a round trip of its own."""
    return f"{round(statement_timeout_s * 1000)}ms", f"{round(lock_timeout_s * 1000)}ms"


def libpq_options(url: str) -> dict[str, tuple[str, str]]:
    """The connection options libpq will use for ``url``, each as ``(value, source)``: the
    URL's own, else its environment variable's (``PGSSLMODE``, ``PGHOST``, ...; the source
    is the variable's name), else libpq's compiled-in default (source ``default``); options
    none of the three sets are absent, and so is the password. Resolved by libpq itself
    (``PQconninfoParse`` and ``PQconndefaults``, through psycopg), so medserve judges what
    libpq will do; a service file (``PGSERVICE``) is not read. Raises
    :class:`DatabaseError` (scrubbed) when libpq refuses the URL, ImportError without
    psycopg."""
    import os

    import psycopg
    from psycopg import pq

    try:
        given = pq.Conninfo.parse(url.encode())
    except psycopg.Error as exc:
        reason = scrub(str(exc).strip(), url)
        raise DatabaseError(f"libpq cannot read {redact(url)}: {reason}") from None
    defaults = {o.keyword: o for o in pq.Conninfo.get_defaults()}
    found: dict[str, tuple[str, str]] = {}
    for option in given:
        name = option.keyword.decode()
        if name == "password":
            continue
        if option.val is not None:
            found[name] = (option.val.decode(), "url")
            continue
        default = defaults.get(option.keyword)
        if default is None or default.val is None:
            continue
        envvar = default.envvar.decode() if default.envvar else ""
        source = envvar if envvar and os.environ.get(envvar) is not None else "default"
        found[name] = (default.val.decode(), source)
    return found


def connect(
    url: str,
    *,
    autocommit: bool = False,
    connect_timeout_s: int = CONNECT_TIMEOUT_S,
    statement_timeout_s: float | None = None,
    lock_timeout_s: float | None = None,
) -> psycopg.Connection:
    """A connection to ``url``; :class:`DatabaseError` naming the redacted URL and the
    driver's reason (scrubbed) when it cannot be made. With ``statement_timeout_s`` (and
    ``lock_timeout_s``, default the same) every statement of the session is bounded: one
    that runs or waits for a lock longer fails (``QueryCanceled``/``LockNotAvailable``).
    Those on a request's or a writer's path are bounded; read tools (verify, export) that
    may scan a whole log are not."""
    import psycopg

    try:
        conn = psycopg.connect(url, autocommit=autocommit, connect_timeout=connect_timeout_s)
    except psycopg.Error as exc:
        reason = scrub(str(exc).strip(), url)
        raise DatabaseError(f"cannot connect to {redact(url)}: {reason}") from None
    if statement_timeout_s is None:
        return conn
    lock_s = statement_timeout_s if lock_timeout_s is None else lock_timeout_s
    try:
        conn.execute(BOUNDS, bounds(statement_timeout_s, lock_s))
        conn.commit()  # outside autocommit, a rolled-back transaction would undo the SETs
    except psycopg.Error as exc:
        conn.close()
        reason = scrub(str(exc).strip(), url)
        raise DatabaseError(f"cannot configure a session on {redact(url)}: {reason}") from None
    return conn


def migrate(
    conn: psycopg.Connection,
    component: str,
    migrations: Sequence[str],
    grants: Callable[[psycopg.Connection, Granted], None] | None = None,
    *,
    url: str = "",
    migrate_hint: str = "",
    granted: Granted | None = None,
) -> int:
    """Bring ``component``'s schema to ``len(migrations)``; returns the version it is at.

    ``conn`` must not be in a transaction. ``grants`` runs after the migrations (in the same
    transaction) when this role could apply them, i.e. owns the schema, and notes what it
    did in ``granted`` (:func:`grant`; ``granted.refused`` when this role may not change
    the schema, so nothing was granted). Raises :class:`SchemaError` (newer schema, or
    pending migrations this role may not apply: ``migrate_hint`` says how to apply them)
    or :class:`DatabaseError`.
    """
    granted = granted if granted is not None else Granted()
    import psycopg

    target = len(migrations)
    waited = DatabaseError(
        f"the {component} schema could not be checked or migrated: a lock it needs was held "
        f"for more than {MIGRATE_LOCK_TIMEOUT_S:g} s by another session (another gateway "
        "migrating, or a long transaction on its tables: see pg_stat_activity); start again "
        "once it is done"
    )
    try:
        with conn.transaction():
            _bound_migration(conn)
            current = _version(conn, component)
    except psycopg.errors.UndefinedTable:
        current = 0
    except psycopg.errors.LockNotAvailable:
        raise waited from None
    except psycopg.Error as exc:
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
            _bound_migration(conn)
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
                grants(conn, granted)
    except psycopg.errors.InsufficientPrivilege:
        if current == target:  # up to date; re-granting is the owner's business
            granted.refused, granted.lines = True, []
            return current
        raise SchemaError(
            f"the database's {component} schema is at version {current} and this medserve "
            f"needs {target}, but the role it logs in as may not change the schema: "
            f"{migrate_hint or 'apply the migrations as the owner role'}"
        ) from None
    except psycopg.errors.LockNotAvailable:
        raise waited from None
    except psycopg.Error as exc:
        raise DatabaseError(
            f"migrating the {component} schema failed: {scrub(str(exc), url)}"
        ) from None
    return target


def _bound_migration(conn: psycopg.Connection) -> None:
    """This transaction's bounds: lock waits :data:`MIGRATE_LOCK_TIMEOUT_S`, statements
    unbounded (a migration that works on a large table takes what it takes; the session's
    own statement bound, meant for one batch or one request, must not cut it)."""
    conn.execute(
        "SELECT set_config('statement_timeout', '0', true), set_config('lock_timeout', %s, true)",
        (f"{round(MIGRATE_LOCK_TIMEOUT_S * 1000)}ms",),
    )


def _version(conn: psycopg.Connection, component: str) -> int:
    row = conn.execute(
        "SELECT version FROM schema_version WHERE component = %s", (component,)
    ).fetchone()
    return int(row[0]) if row else 0


def role_exists(conn: psycopg.Connection, role: str) -> bool:
    row = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
    return row is not None


def grant(
    conn: psycopg.Connection,
    privileges: str,
    tables: Sequence[str],
    role: str,
    granted: Granted | None = None,
) -> None:
    """``GRANT privileges ON tables TO role`` (names quoted) if the role exists and this
    role may grant (owns the tables, or is a superuser); notes in ``granted`` what it did,
    or that the role is missing, or that this role may not grant. (PostgreSQL itself only
    warns, "no privileges were granted", when a role that may not grant tries.)"""
    from psycopg import sql

    granted = granted if granted is not None else Granted()
    if not role_exists(conn, role):
        granted.missing.add(role)
        return
    owns = conn.execute(
        "SELECT coalesce(bool_and(pg_has_role(current_user, c.relowner, 'USAGE')), false) "
        "FROM pg_class c WHERE c.oid = ANY(%s::regclass[])",
        (list(tables),),
    ).fetchone()
    if not owns or not owns[0]:
        granted.refused = True
        return
    query = sql.SQL("GRANT {} ON {} TO {}").format(
        sql.SQL(privileges),
        sql.SQL(", ").join(sql.Identifier(t) for t in tables),
        sql.Identifier(role),
    )
    conn.execute(query)
    granted.lines.append(f"{role}: {privileges} on {', '.join(tables)}")


def missing_roles(conn: psycopg.Connection, roles: Sequence[str]) -> list[str]:
    """The ``roles`` that do not exist in the cluster (any role may ask), in order."""
    return [r for r in dict.fromkeys(roles) if not role_exists(conn, r)]


def rows(conn: psycopg.Connection, query: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """All rows of ``query`` (a typed shorthand)."""
    return list(conn.execute(query.encode(), args).fetchall())
