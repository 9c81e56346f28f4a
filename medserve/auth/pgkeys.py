"""API keys in PostgreSQL, shared by every gateway on one database.

The same interface as the SQLite :class:`~medserve.auth.keys.KeyStore` (``create``,
``revoke``, ``all``, ``lookup``, ``changes``, ``mark_audited``, ``close``), chosen by
``[auth] url = "postgresql://…"``; ``medserve keys … --db postgresql://…`` manages it.

Revocation on every gateway, and the bound. A gateway never asks the database during a
request: :meth:`PgKeyStore.lookup` reads an in-memory copy of the keys table.
:meth:`PgKeyStore.refresh` (every ``refresh_s``, 0.5 s by default, from
:meth:`medserve.api.security.Security.refresh_keys`) reads one row, the keys' generation
(bumped by a trigger on every change to ``auth_keys``, whoever makes it, even by hand in
``psql``), and reloads the table only when it moved. Each successful refresh confirms
the copy as of the moment it *started*. A lookup made more than ``stale_after_s`` (2 s
by default) after the last confirmation refuses with 503 ``key_store_unavailable``
instead of trusting a copy it cannot confirm. Hence: a revocation committed at time t is
refused by every gateway from t + ``stale_after_s`` at the latest, whatever happens to
the network or the database (typically from t + ``refresh_s`` plus one round trip), and
a new key works within the same time. The trigger also sends ``NOTIFY medserve_keys``:
:meth:`PgKeyStore.watch` listens on a connection of its own and refreshes at once, so a
change usually reaches every gateway in milliseconds; the polling stays as the guarantee
(a notification is lost while the listening connection is down).

The journal. Every change to ``auth_keys`` is journaled by the database itself, in the
changing transaction (a row trigger, migration 2), so ``medserve keys`` and a hand edit in
``psql`` are journaled the same way, exactly once: ``key.created``, ``key.revoked``,
``key.unrevoked``, ``key.changed`` (with the names of the ``changed`` columns; the
secret's hash by name only), ``key.deleted`` (also for each key a TRUNCATE removes), with
the key's non-secret fields and the database role that made it (``db_user``:
``current_user``; ``db_session_user``: the role that logged in). A role allowed to change
``auth_keys`` but not to write ``auth_journal`` cannot change a key at all: fail closed.
Each gateway copies the entries into its audit log
(:meth:`medserve.api.security.Security.audit_key_changes`) and marks each one copied in
``auth_copied``, one row per (instance, entry), which the gateway role may INSERT and
never UPDATE or DELETE: no credential of a gateway can move a mark back (copies twice) or
forward (hides entries), and an entry committed after a higher-numbered one is still
found. What the schema cannot stop: a gateway credential *adding* marks for another
instance, hiding entries from that instance's log; ``medserve audit verify --db`` (keys
and audit in one database) names every entry that reaches no instance's log.

Schema: component ``keys`` of :mod:`medserve.pgsql`'s ``schema_version``, migrated on
first use by a role that owns the schema (``medserve keys migrate --db <owner URL>``, or
any ``medserve keys`` command or gateway logging in as the owner), with grants: the
gateway role reads the keys and the journal, adds rows to ``auth_copied`` and writes
``auth_rate``, never ``auth_keys`` or the journal; the auditor role reads. Tables:
``auth_keys`` (as the SQLite ``keys`` table; times are ``timestamptz``, models a
``text[]``), ``auth_journal`` and ``auth_copied`` (the change journal and each gateway's
copy marks), ``auth_generation`` (one row), and ``auth_rate`` (the shared rate limit
buckets of :mod:`medserve.auth.pglimits`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from medserve import pgsql
from medserve.auth.keys import (
    PREFIX,
    ROLES,
    Key,
    KeyStoreError,
    Role,
    check_new_key,
    digest,
    new_secret,
)
from medserve.auth.pglimits import FUNCTIONS
from medserve.errors import UnavailableError

log = logging.getLogger(__name__)

COMPONENT = "keys"
MIGRATE_HINT = "run `medserve keys migrate --db <the owner role's URL>`"
GATEWAY_ROLE = "medserve_gateway"  # the defaults of [audit] gateway_role / auditor_role
AUDITOR_ROLE = "medserve_auditor"
CHANNEL = "medserve_keys"
MIGRATIONS: tuple[str, ...] = (  # MIGRATIONS[i] brings the schema to version i + 1
    f"""
    CREATE TABLE auth_keys (
        id text PRIMARY KEY,
        name text NOT NULL,
        role text NOT NULL CHECK (role IN ('user', 'admin', 'auditor')),
        models text[] NOT NULL,
        rpm integer CHECK (rpm > 0),
        tpm integer CHECK (tpm > 0),
        expires timestamptz,
        created timestamptz NOT NULL,
        revoked timestamptz,
        secret_sha256 bytea NOT NULL,
        fallback boolean NOT NULL DEFAULT true
    );
    CREATE TABLE auth_journal (
        n bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        ts timestamptz NOT NULL DEFAULT clock_timestamp(),
        action text NOT NULL,
        key_id text NOT NULL,
        details jsonb NOT NULL
    );
    CREATE TABLE auth_audited (instance text PRIMARY KEY, last bigint NOT NULL);
    CREATE TABLE auth_generation (
        one boolean PRIMARY KEY DEFAULT true CHECK (one),
        generation bigint NOT NULL
    );
    INSERT INTO auth_generation VALUES (true, 0);
    CREATE FUNCTION auth_keys_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE auth_generation SET generation = generation + 1;
        PERFORM pg_notify('{CHANNEL}', '');
        RETURN NULL;
    END $$;
    CREATE TRIGGER auth_keys_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
        ON auth_keys FOR EACH STATEMENT EXECUTE FUNCTION auth_keys_changed();
    -- Unlogged: no WAL, no fsync per admission; a database crash empties it (every
    -- bucket full again) and a standby does not have it, which a rate limit can afford.
    CREATE UNLOGGED TABLE auth_rate (
        key_id text PRIMARY KEY,
        requests double precision NOT NULL,
        tokens double precision NOT NULL,
        updated timestamptz NOT NULL
    );
    """
    + FUNCTIONS,
    # 2: the database journals every change to auth_keys itself (a trigger per row, so a
    # change made by hand in psql is journaled exactly as `medserve keys` is), and each
    # gateway's copy marks are rows it may add, never change or remove (auth_copied).
    """
    CREATE FUNCTION auth_stamp(t timestamptz) RETURNS text LANGUAGE sql IMMUTABLE AS $$
        SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
    $$;
    -- A key's non-secret fields, and the database role that changed it: current_user
    -- (the role in effect, after SET ROLE) and session_user (the role that logged in).
    CREATE FUNCTION auth_key_details(k auth_keys) RETURNS jsonb LANGUAGE sql STABLE AS $$
        SELECT jsonb_build_object(
            'name', k.name, 'role', k.role, 'models', to_jsonb(k.models),
            'rpm', k.rpm, 'tpm', k.tpm, 'expires', auth_stamp(k.expires),
            'created', auth_stamp(k.created), 'revoked', auth_stamp(k.revoked),
            'fallback', k.fallback,
            'db_user', current_user::text, 'db_session_user', session_user::text)
    $$;
    CREATE FUNCTION auth_keys_journal() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        act text;
        info jsonb;
        changed text[];
    BEGIN
        IF TG_OP = 'INSERT' THEN
            INSERT INTO auth_journal (action, key_id, details)
                VALUES ('key.created', NEW.id, auth_key_details(NEW));
        ELSIF TG_OP = 'DELETE' THEN
            INSERT INTO auth_journal (action, key_id, details)
                VALUES ('key.deleted', OLD.id, auth_key_details(OLD));
        ELSE
            -- The columns whose value changed (by name: never the secret's hash itself).
            SELECT coalesce(array_agg(c.key ORDER BY c.key), '{}') INTO changed
                FROM jsonb_each(to_jsonb(NEW)) c
                WHERE c.value IS DISTINCT FROM to_jsonb(OLD) -> c.key;
            IF cardinality(changed) = 0 THEN
                RETURN NULL;  -- an UPDATE that changed nothing
            END IF;
            act := CASE
                WHEN OLD.revoked IS NULL AND NEW.revoked IS NOT NULL THEN 'key.revoked'
                WHEN OLD.revoked IS NOT NULL AND NEW.revoked IS NULL THEN 'key.unrevoked'
                ELSE 'key.changed' END;
            info := auth_key_details(NEW) || jsonb_build_object('changed', to_jsonb(changed));
            IF NEW.id IS DISTINCT FROM OLD.id THEN
                info := info || jsonb_build_object('previous_id', OLD.id);
            END IF;
            INSERT INTO auth_journal (action, key_id, details) VALUES (act, NEW.id, info);
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER auth_keys_journal AFTER INSERT OR UPDATE OR DELETE ON auth_keys
        FOR EACH ROW EXECUTE FUNCTION auth_keys_journal();
    -- TRUNCATE fires no row trigger: journal every key it is about to remove.
    CREATE FUNCTION auth_keys_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO auth_journal (action, key_id, details)
            SELECT 'key.deleted', k.id, auth_key_details(k) || '{"truncated": true}'::jsonb
            FROM auth_keys k ORDER BY k.created;
        RETURN NULL;
    END $$;
    CREATE TRIGGER auth_keys_truncated BEFORE TRUNCATE ON auth_keys
        FOR EACH STATEMENT EXECUTE FUNCTION auth_keys_truncated();
    -- One row per (gateway instance, journal entry) copied into that gateway's audit
    -- log: a gateway adds rows and may neither change nor remove one (no "last" to move).
    CREATE TABLE auth_copied (
        instance text NOT NULL,
        n bigint NOT NULL,
        copied_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        PRIMARY KEY (instance, n)
    );
    INSERT INTO auth_copied (instance, n)
        SELECT a.instance, j.n FROM auth_audited a JOIN auth_journal j ON j.n <= a.last;
    DROP TABLE auth_audited;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
COLUMNS = "id, name, role, models, rpm, tpm, expires, created, revoked, secret_sha256, fallback"
REFRESH_S = 0.5
STALE_AFTER_S = 2.0
# Every statement of the store's sessions is bounded: a refresh is one row and, on a change,
# the keys table (milliseconds); past STALE_AFTER_S its answer is of no use to lookups
# anyway. A command's write (create, revoke) waits at most LOCK_TIMEOUT_S for a key's row.
STATEMENT_TIMEOUT_S = 5.0
LOCK_TIMEOUT_S = 2.0


DRIVER_MISSING = (
    "keys in PostgreSQL need the driver: install medserve with the postgres extra "
    "(pip install 'medserve[postgres]')"
)


def require_driver() -> None:
    """Raise :class:`KeyStoreError` saying what to install when psycopg is missing."""
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError:
        raise KeyStoreError(DRIVER_MISSING) from None


def grants(gateway_role: str, auditor_role: str) -> Callable[[Any, pgsql.Granted], None]:
    """The migration's grants (to the roles that exist; see the module docstring): the
    gateway reads the keys and the journal, adds its copy marks (``auth_copied``: INSERT,
    never UPDATE or DELETE) and keeps the rate buckets; the auditor reads."""

    def apply(conn: Any, granted: pgsql.Granted) -> None:
        read = ["schema_version", "auth_keys", "auth_journal", "auth_generation"]
        pgsql.grant(conn, "SELECT", read, gateway_role, granted)
        pgsql.grant(conn, "SELECT, INSERT", ["auth_copied"], gateway_role, granted)
        pgsql.grant(conn, "SELECT, INSERT, UPDATE", ["auth_rate"], gateway_role, granted)
        audit = ["schema_version", "auth_keys", "auth_journal", "auth_copied"]
        pgsql.grant(conn, "SELECT", audit, auditor_role, granted)

    return apply


def schema_version(conn: Any) -> int | None:
    """The keys schema's version, read only: None when the database has none yet."""
    exists = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return None
    row = conn.execute(
        "SELECT version FROM schema_version WHERE component = %s", (COMPONENT,)
    ).fetchone()
    return int(row[0]) if row else None


def stamp(moment: datetime | None) -> str | None:
    """A ``timestamptz`` as the stored form of :func:`medserve.audit.record.now`."""
    if moment is None:
        return None
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_stamp(value: str | None) -> datetime | None:
    if value is None:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


class PgKeyStore:
    """The keys in PostgreSQL at ``url``; see the module docstring for the cache bound.

    Errors: operations raise :class:`KeyStoreError` (message without the password) when
    the database cannot be reached or its schema is unusable; :meth:`lookup` raises
    :class:`~medserve.errors.UnavailableError` (503) when its copy is older than
    ``stale_after_s``. ``clock``: seconds, monotonic (tests may pass their own).
    """

    def __init__(
        self,
        url: str,
        refresh_s: float = REFRESH_S,
        stale_after_s: float = STALE_AFTER_S,
        clock: Callable[[], float] = time.monotonic,
        gateway_role: str = GATEWAY_ROLE,
        auditor_role: str = AUDITOR_ROLE,
    ) -> None:
        self.url = url
        self.roles = (gateway_role, auditor_role)
        self.refresh_s = refresh_s
        self.stale_after_s = stale_after_s
        self.clock = clock
        self._keys: dict[str, tuple[Key, bytes]] = {}
        self._generation: int | None = None
        self._confirmed: float | None = None  # clock() when the last good refresh began
        self._conn: Any = None  # the refresher's connection, kept between refreshes
        self._lock = threading.Lock()  # one refresh at a time
        self.schema: int | None = None  # the schema version, once migrated
        self.listening = False  # whether watch() has a LISTEN connection now

    @property
    def shown(self) -> str:
        """The connection string without its password (:func:`medserve.pgsql.redact`)."""
        return pgsql.redact(self.url)

    def _fail(self, exc: BaseException) -> KeyStoreError:
        kind = type(exc).__name__
        return KeyStoreError(
            f"keys database {self.shown}: {pgsql.scrub(str(exc), self.url) or kind} ({kind})"
        )

    def _connect(self) -> Any:
        """A new autocommit connection, the schema migrated (or checked) once per store."""
        require_driver()
        try:
            conn = pgsql.connect(
                self.url,
                autocommit=True,
                statement_timeout_s=STATEMENT_TIMEOUT_S,
                lock_timeout_s=LOCK_TIMEOUT_S,
            )
        except pgsql.DatabaseError as exc:
            raise KeyStoreError(f"keys database: {exc}") from None
        try:
            if self.schema is None:
                self.schema = self.migrate(conn)
        except pgsql.DatabaseError as exc:
            conn.close()
            raise KeyStoreError(f"keys database {self.shown}: {exc}") from None
        return conn

    def migrate(self, conn: Any, granted: pgsql.Granted | None = None) -> int:
        """Apply pending migrations and the grants (as the owner) or check there are none;
        :class:`medserve.pgsql.SchemaError` otherwise. Returns the version; ``granted``
        says what the grants did (:func:`medserve.pgsql.migrate`)."""
        return pgsql.migrate(
            conn,
            COMPONENT,
            MIGRATIONS,
            grants(*self.roles),
            url=self.url,
            migrate_hint=MIGRATE_HINT,
            granted=granted,
        )

    def _run(self, work: Callable[[Any], Any]) -> Any:
        require_driver()
        import psycopg

        conn = self._connect()
        try:
            return work(conn)
        except psycopg.Error as exc:
            raise self._fail(exc) from None
        finally:
            conn.close()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

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
        """A new key and its full token, shown once and never stored (as the SQLite store)."""
        check_new_key(name, role)
        key_id, secret = new_secret()

        def insert(conn: Any) -> Key:
            with conn.transaction():
                row = conn.execute(
                    f"INSERT INTO auth_keys ({COLUMNS}) VALUES "
                    "(%s, %s, %s, %s, %s, %s, %s, clock_timestamp(), NULL, %s, %s) "
                    f"RETURNING {COLUMNS}",
                    (
                        key_id,
                        name,
                        role,
                        list(models) or ["*"],
                        rpm,
                        tpm,
                        parse_stamp(expires),
                        digest(secret),
                        fallback,
                    ),
                ).fetchone()
                # The row's trigger journals the creation (migration 2).
                return _key(row)

        key: Key = self._run(insert)
        return key, f"{PREFIX}{key_id}_{secret}"

    def revoke(self, key_id: str) -> Key:
        def update(conn: Any) -> Key:
            with conn.transaction():
                row = conn.execute(
                    f"SELECT {COLUMNS} FROM auth_keys WHERE id = %s FOR UPDATE", (key_id,)
                ).fetchone()
                if row is None:
                    raise KeyStoreError(f"no key with id {key_id}")
                key = _key(row)
                if key.revoked is None:
                    conn.execute(  # journaled by the row's trigger
                        "UPDATE auth_keys SET revoked = clock_timestamp() WHERE id = %s",
                        (key_id,),
                    )
                # Its shared rate buckets are of no more use (a gateway that still admits
                # it in the last moments of its copy's trust creates the row again).
                conn.execute("DELETE FROM auth_rate WHERE key_id = %s", (key_id,))
            return key

        key: Key = self._run(update)
        return key

    def all(self) -> list[Key]:
        query = f"SELECT {COLUMNS} FROM auth_keys ORDER BY created"
        rows = self._run(lambda conn: conn.execute(query).fetchall())
        return [_key(row) for row in rows]

    def inspect(self) -> tuple[int | None, int | None]:
        """(schema version, active keys) read without changing anything (for ``medserve
        doctor``): (None, None) for a database without the schema yet, (version, None)
        for a version this medserve does not know. Raises :class:`KeyStoreError`."""
        require_driver()
        import psycopg

        try:
            with pgsql.connect(
                self.url,
                autocommit=True,
                statement_timeout_s=STATEMENT_TIMEOUT_S,
                lock_timeout_s=LOCK_TIMEOUT_S,
            ) as conn:
                version = schema_version(conn)
                if version != SCHEMA_VERSION:
                    return version, None
                row = conn.execute(
                    "SELECT count(*) FROM auth_keys WHERE revoked IS NULL "
                    "AND (expires IS NULL OR expires > clock_timestamp())"
                ).fetchone()
                return version, int(row[0]) if row else 0
        except pgsql.DatabaseError as exc:
            raise KeyStoreError(f"keys database: {exc}") from None
        except psycopg.Error as exc:
            raise self._fail(exc) from None

    def refresh(self) -> bool:
        """Confirm the in-memory copy, reloading it if the keys changed; True when it
        reloaded. Raises :class:`KeyStoreError` when the database cannot be read (the copy
        then ages towards ``stale_after_s``). Blocking: call it off the event loop."""
        require_driver()
        import psycopg

        with self._lock:
            started = self.clock()
            kept = self._conn is not None and not self._conn.closed
            try:
                reloaded = self._reload()
            except psycopg.Error as exc:
                broken = self._conn is None or self._conn.broken
                self._drop()
                if not (kept and broken):
                    raise self._fail(exc) from None
                # The kept connection had died while idle (a database restart, an idle
                # cut): once more on a new one before the copy is left to age.
                try:
                    reloaded = self._reload()
                except psycopg.Error as again:
                    self._drop()
                    raise self._fail(again) from None
            self._confirmed = started
            return reloaded

    def _reload(self) -> bool:
        """One refresh on the kept connection (made when missing); psycopg errors raise."""
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
        conn = self._conn
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            row = conn.execute("SELECT generation FROM auth_generation").fetchone()
            generation = int(row[0])
            reloaded = generation != self._generation
            if reloaded:
                rows = conn.execute(f"SELECT {COLUMNS} FROM auth_keys").fetchall()
                self._keys = {str(r[0]): (_key(r), bytes(r[9])) for r in rows}
                self._generation = generation
        return reloaded

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def watch(self) -> None:
        """Refresh (:meth:`refresh`, in a thread) on every ``NOTIFY medserve_keys`` and at
        least every ``refresh_s``, until cancelled. Failures are logged when they start
        and when they end; meanwhile lookups age towards ``stale_after_s`` and refuse."""
        import psycopg

        listener: Any = None
        failing = False
        try:
            while True:
                if listener is None:
                    listener = await self._listen()
                if listener is None:
                    await asyncio.sleep(self.refresh_s)
                else:
                    try:
                        # Returns on the first notification, or after refresh_s.
                        async for _ in listener.notifies(timeout=self.refresh_s, stop_after=1):
                            pass
                    except psycopg.Error:
                        await listener.close()
                        listener, self.listening = None, False
                        await asyncio.sleep(self.refresh_s)
                try:
                    await asyncio.to_thread(self.refresh)
                except KeyStoreError as exc:
                    if not failing:
                        log.warning("keys not refreshed", extra={"error": type(exc).__name__})
                    failing = True
                    continue
                if failing:
                    log.warning("keys refreshed again")
                failing = False
        finally:
            self.listening = False
            if listener is not None:
                await listener.close()

    async def _listen(self) -> Any:
        """A connection listening on :data:`CHANNEL`, or None when it cannot be made (the
        polling carries on; the next round tries again)."""
        import psycopg

        try:
            conn = await psycopg.AsyncConnection.connect(
                self.url, autocommit=True, connect_timeout=pgsql.CONNECT_TIMEOUT_S
            )
        except psycopg.Error:
            return None
        try:
            await conn.execute(pgsql.BOUNDS, pgsql.bounds(STATEMENT_TIMEOUT_S, LOCK_TIMEOUT_S))
            await conn.execute(f"LISTEN {CHANNEL}")
        except psycopg.Error:
            await conn.close()
            return None
        self.listening = True
        return conn

    def age(self) -> float | None:
        """Seconds since the copy was last confirmed; None before the first refresh."""
        return None if self._confirmed is None else self.clock() - self._confirmed

    def lookup(self, key_id: str) -> tuple[Key, bytes] | None:
        """The key and its secret's hash from the copy, or None. No database round trip.
        Raises :class:`~medserve.errors.UnavailableError` (503) when the copy is older than
        ``stale_after_s`` or was never loaded."""
        age = self.age()
        if age is None or age > self.stale_after_s:
            raise UnavailableError(
                "API keys cannot be checked right now; retry shortly.",
                code="key_store_unavailable",
                retry_after=max(1, round(self.refresh_s * 2)),
            )
        return self._keys.get(key_id)

    def changes(self, instance: str) -> list[dict[str, object]]:
        """Journal entries gateway ``instance`` has not yet marked copied, in journal
        order: each entry's own mark, so an entry whose transaction committed after a
        later one's (a hand edit held open in psql) is still found."""

        def read(conn: Any) -> list[Any]:
            rows: list[Any] = conn.execute(
                "SELECT n, ts, action, key_id, details FROM auth_journal j WHERE NOT EXISTS "
                "(SELECT 1 FROM auth_copied c WHERE c.instance = %s AND c.n = j.n) ORDER BY n",
                (instance,),
            ).fetchall()
            return rows

        rows = self._run(read)
        return [
            {"n": n, "ts": stamp(ts), "action": a, "key_id": k, **dict(d)}
            for n, ts, a, k, d in rows
        ]

    def mark_audited(self, instance: str, copied: Sequence[int]) -> None:
        """Mark the journal entries ``copied`` (their ``n``) as in ``instance``'s audit log:
        rows added, never changed (the gateway role may only INSERT them)."""
        self._run(
            lambda conn: conn.execute(
                "INSERT INTO auth_copied (instance, n) SELECT %s, unnest(%s::bigint[]) "
                "ON CONFLICT DO NOTHING",
                (instance, list(copied)),
            )
        )


def _key(row: Any) -> Key:
    key_id, name, role, models, rpm, tpm, expires, created, revoked, _, fallback = row
    return Key(
        id=str(key_id),
        name=str(name),
        role=next((r for r in ROLES if r == role), "user"),
        models=tuple(models),
        rpm=rpm,
        tpm=tpm,
        expires=stamp(expires),
        created=stamp(created) or "",
        revoked=stamp(revoked),
        fallback=bool(fallback),
    )
