"""The web side of API keys: authenticate in the middleware, authorize in the routes.

See :mod:`medserve.auth` for the rules. With ``auth.enabled = false`` every request acts
as :data:`ANONYMOUS` (admin, every model): for development only, and ``medserve doctor``
says so.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Iterable
from typing import TypeVar

from starlette.requests import Request
from starlette.types import Scope

from medserve.api.audit import Auditor
from medserve.audit import AuditError
from medserve.auth import Authenticator, Key, RateLimiter, Role, require_role
from medserve.auth.keys import KeyBackend, KeyStoreError, open_keys
from medserve.auth.pgkeys import PgKeyStore
from medserve.auth.pglimits import SharedRateLimiter
from medserve.config import AuthSettings
from medserve.errors import AuthenticationError
from medserve.metrics import Metrics

log = logging.getLogger(__name__)

ANONYMOUS = Key("anonymous", "auth disabled", "admin", ("*",))
JOURNAL_POLL_S = 5.0
T = TypeVar("T")


class Security:
    """Authentication, rate limits and the key journal of one app.

    With ``[auth] url`` the keys are a :class:`PgKeyStore` (an in-memory copy refreshed
    by :meth:`refresh_keys`) and the limits a :class:`SharedRateLimiter`; else the SQLite
    store and the per-process :class:`RateLimiter`. :meth:`start` before serving (it
    loads the keys: the server does not start without its keys database),
    :meth:`aclose` after.
    """

    def __init__(self, settings: AuthSettings) -> None:
        self.settings = settings
        self.store: KeyBackend | None = None
        self.shared: SharedRateLimiter | None = None
        if settings.enabled and settings.url is not None:
            url = settings.url.get_secret_value()
            self.store = PgKeyStore(url, settings.refresh_s, settings.stale_after_s)
            self.shared = SharedRateLimiter(url, settings.rate_flush_s)
        elif settings.enabled:
            self.store = open_keys(settings.keys_path)
        dev = settings.dev_key.get_secret_value() if settings.dev_key else None
        self.authenticator = Authenticator(self.store, dev)
        self.limiter = RateLimiter()

    def watch(self, metrics: Metrics) -> None:
        """Report the keys copy's age and the shared limits' round trips and failures to
        ``metrics`` (PostgreSQL only; nothing for SQLite)."""
        if isinstance(self.store, PgKeyStore):
            metrics.watch_keys(self.store.age)
        if self.shared is not None:
            self.shared.on_check = metrics.rate_limit_check.observe
            self.shared.on_unavailable = metrics.rate_limit_unavailable.inc

    async def start(self) -> None:
        """Load the keys and open the shared limits (PostgreSQL only). Raises
        :class:`KeyStoreError` (message without the password) when the database cannot
        be used."""
        if isinstance(self.store, PgKeyStore):
            await asyncio.to_thread(self.store.refresh)
        if self.shared is not None:
            await self.shared.open()

    async def refresh_keys(self) -> None:
        """Keep a PostgreSQL store's copy of the keys confirmed: at once on a change
        (NOTIFY) and every ``refresh_s`` (:meth:`PgKeyStore.watch`; the bound is in
        :mod:`medserve.auth.pgkeys`). Returns at once for
        SQLite, whose every lookup reads the file."""
        store = self.store
        if not isinstance(store, PgKeyStore):
            return
        await store.watch()

    async def admit(self, key: Key) -> None:
        """Take one request from ``key``'s rate limits; raises 429 (or 503 when shared
        limits cannot be checked)."""
        if self.shared is not None:
            await self.shared.admit(key)
        else:
            self.limiter.admit(key)

    def health(self) -> dict[str, object] | None:
        """The keys database in ``/ready``: None for SQLite; for PostgreSQL its shown
        string (no password), the schema version and how old the keys copy is."""
        store = self.store
        if not isinstance(store, PgKeyStore):
            return None
        age = store.age()
        return {
            "ok": age is not None and age <= store.stale_after_s,
            "database": store.shown,
            "schema": store.schema,
            "keys_age_s": None if age is None else round(age, 3),
        }

    def public(self, path: str) -> bool:
        if not self.settings.enabled or path == "/health":
            return True
        return path == "/metrics" and self.settings.metrics == "open"

    def authenticate(self, scope: Scope) -> Key | None:
        """The request's key; None for public paths and for ``/ready`` asked without an
        Authorization header (status only). Raises 401."""
        if self.public(scope["path"]):
            return None if self.settings.enabled else ANONYMOUS
        values = [v for k, v in scope["headers"] if k == b"authorization"]
        if len(values) > 1:
            raise AuthenticationError(
                "Send exactly one Authorization header.", code="invalid_authorization"
            )
        if not values and scope["path"] == "/ready":
            return None  # a probe without a key gets the status alone; details need a key
        header = values[0].decode("latin-1") if values else None
        return self.authenticator.authenticate(header)

    def charge(self, key: Key | None, tokens: int) -> None:
        if key is not None and tokens:
            if self.shared is not None:
                self.shared.charge(key, tokens)
            else:
                self.limiter.charge(key, tokens)

    async def audit_key_changes(self, auditor: Auditor, instance: str) -> None:
        """Copy the key journal (every change to the keys, journaled by the database
        itself: `medserve keys` or a hand edit) into this server's audit log, now and
        every few seconds. Each event carries its entry's ``journal`` number; an entry is
        marked copied only once its record committed, and one already in this log (a
        mark lost to a crash or a database fault after the record committed) is marked,
        never copied twice."""
        store, log_store = self.store, auditor.store
        if store is None or log_store is None:
            return
        copied: set[int] | None = None  # the journal entries in this log, read once
        while True:
            try:
                if copied is None:
                    copied = await asyncio.to_thread(log_store.journal_ids)
                changes = await self._off_loop(store.changes, instance)
                done: list[int] = []
                for change in changes:
                    n = int(str(change["n"]))
                    if n not in copied:
                        details = {k: v for k, v in change.items() if k not in ("n", "action")}
                        if not await auditor.event(str(change["action"]), journal=n, **details):
                            break  # not recorded: neither marked nor skipped; next round
                        copied.add(n)
                    done.append(n)
                if done:
                    await self._off_loop(store.mark_audited, instance, done)
            except (KeyStoreError, AuditError, OSError, ValueError, sqlite3.Error) as exc:
                # Retried on the next round; the journal keeps every entry until copied.
                log.warning("key journal not read", extra={"error": type(exc).__name__})
            except Exception:
                log.exception("key journal copy failed")  # a bug: say so, keep trying
            await asyncio.sleep(JOURNAL_POLL_S)

    async def _off_loop(self, call: Callable[..., T], *args: object) -> T:
        """``call(*args)`` in a thread for PostgreSQL (a network round trip); inline for
        SQLite, as it always ran (a local file; its first use creates it)."""
        if isinstance(self.store, PgKeyStore):
            return await asyncio.to_thread(call, *args)
        return call(*args)

    async def aclose(self) -> None:
        if self.shared is not None:
            await self.shared.close()
        if self.store is not None:
            self.store.close()


def principal(request: Request) -> Key:
    """The key the middleware authenticated (ANONYMOUS when auth is off)."""
    key: Key | None = request.state.key
    assert key is not None, "route reached without authentication"
    return key


def role(request: Request, roles: Iterable[Role]) -> Key:
    key = principal(request)
    require_role(key, roles)
    return key
