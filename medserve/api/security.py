"""The web side of API keys: authenticate in the middleware, authorize in the routes.

See :mod:`medserve.auth` for the rules. With ``auth.enabled = false`` every request acts
as :data:`ANONYMOUS` (admin, every model): for development only, and ``medserve doctor``
says so.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Iterable

from starlette.requests import Request
from starlette.types import Scope

from medserve.api.audit import Auditor
from medserve.auth import Authenticator, Key, KeyStore, RateLimiter, Role, require_role
from medserve.auth.keys import KeyStoreError
from medserve.config import AuthSettings
from medserve.errors import AuthenticationError

log = logging.getLogger(__name__)

ANONYMOUS = Key("anonymous", "auth disabled", "admin", ("*",))
JOURNAL_POLL_S = 5.0


class Security:
    """Authentication, rate limits and the key journal of one app."""

    def __init__(self, settings: AuthSettings) -> None:
        self.settings = settings
        self.store = KeyStore(settings.keys_path) if settings.enabled else None
        dev = settings.dev_key.get_secret_value() if settings.dev_key else None
        self.authenticator = Authenticator(self.store, dev)
        self.limiter = RateLimiter()

    def public(self, path: str) -> bool:
        if not self.settings.enabled or path == "/health":
            return True
        return path == "/metrics" and self.settings.metrics == "open"

    def authenticate(self, scope: Scope) -> Key | None:
        """The request's key; None for public paths. Raises 401."""
        if self.public(scope["path"]):
            return None if self.settings.enabled else ANONYMOUS
        values = [v for k, v in scope["headers"] if k == b"authorization"]
        if len(values) > 1:
            raise AuthenticationError(
                "Send exactly one Authorization header.", code="invalid_authorization"
            )
        header = values[0].decode("latin-1") if values else None
        return self.authenticator.authenticate(header)

    def charge(self, key: Key | None, tokens: int) -> None:
        if key is not None and tokens:
            self.limiter.charge(key, tokens)

    async def audit_key_changes(self, auditor: Auditor, instance: str) -> None:
        """Copy key creations and revocations (made by `medserve keys`, another process)
        into this server's audit log, now and every few seconds."""
        if self.store is None or auditor.store is None:
            return
        while True:
            try:
                changes = self.store.changes(instance)
                for change in changes:
                    details = {k: v for k, v in change.items() if k not in ("n", "action")}
                    await auditor.event(str(change["action"]), **details)
                if changes:
                    self.store.mark_audited(instance, int(str(changes[-1]["n"])))
            except (KeyStoreError, OSError, ValueError, sqlite3.Error) as exc:
                # Retried on the next round; the journal keeps every entry until copied.
                log.warning("key journal not read", extra={"error": type(exc).__name__})
            except Exception:
                log.exception("key journal copy failed")  # a bug: say so, keep trying
            await asyncio.sleep(JOURNAL_POLL_S)

    def close(self) -> None:
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
