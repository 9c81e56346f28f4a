"""Who may ask what: API key authentication, roles and model scopes, rate limits.

Authentication happens for every request but ``/health`` (and ``/metrics`` when it is
configured open), before routing, so probing unknown paths without a key gets 401 too.
Authorization happens in the routes, which know the model and the operation: a key
outside its models gets 403 ``model_not_permitted``, a role outside an operation 403
``role_not_permitted``. Keys come only from ``Authorization: Bearer``, never from the
query string. Rate limits are token buckets per key and per process (each replica
enforces its own).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from medserve.auth.keys import Key, KeyBackend, KeyStore, KeyStoreError, Role, matches, split
from medserve.errors import AuthenticationError, PermissionDeniedError, RateLimitError

__all__ = [
    "Authenticator",
    "Key",
    "KeyStore",
    "KeyStoreError",
    "RateLimiter",
    "Role",
    "require_role",
    "require_model",
]

DEV_KEY_ID = "dev"
# Error code -> bounded metric reason.
AUTH_REASONS = {
    "missing_api_key": "missing",
    "invalid_authorization": "malformed",
    "invalid_api_key": "invalid",
    "key_revoked": "revoked",
    "key_expired": "expired",
    "model_not_permitted": "model_not_permitted",
    "role_not_permitted": "role_not_permitted",
}


def _refuse(code: str, message: str, key_id: str | None = None) -> AuthenticationError:
    return AuthenticationError(message, code=code, key_id=key_id)


def _is_token(value: str) -> bool:
    """Printable ASCII without spaces: every key medserve issues, and nothing else.

    Anything else (non-ASCII, control characters, NUL, tabs) cannot be a key and is a
    malformed header, whatever the store holds.
    """
    return value.isascii() and value.isprintable() and " " not in value


def _digest(value: str) -> bytes:
    """SHA-256 of ``value``: equal-length bytes for a constant-time comparison.

    ``hmac.compare_digest`` refuses ``str`` with non-ASCII characters (TypeError, a 500),
    and on bytes of different lengths it returns early; digests have neither problem.
    """
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


class Authenticator:
    """Turns an ``Authorization`` header into a :class:`Key`, or raises 401."""

    def __init__(self, store: KeyBackend | None, dev_key: str | None = None) -> None:
        self.store = store
        self.dev_key = dev_key

    def authenticate(self, header: str | None) -> Key:
        if header is None:
            raise _refuse(
                "missing_api_key", "An API key is required: send 'Authorization: Bearer <key>'."
            )
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        # RFC 9110: the scheme is case-insensitive; the key itself is not.
        if scheme.lower() != "bearer" or not token or not _is_token(token):
            raise _refuse(
                "invalid_authorization", "The Authorization header must be 'Bearer <key>'."
            )
        if self.dev_key is not None and hmac.compare_digest(_digest(token), _digest(self.dev_key)):
            return Key(DEV_KEY_ID, "dev key", "admin", ("*",))
        invalid = _refuse("invalid_api_key", "The API key is not valid.")
        parts = split(token)
        if parts is None or self.store is None:
            raise invalid
        found = self.store.lookup(parts[0])
        if found is None or not matches(parts[1], found[1]):
            raise invalid
        key = found[0]
        if key.revoked is not None:
            raise _refuse("key_revoked", "This API key has been revoked.", key.id)
        if key.expired():
            raise _refuse("key_expired", "This API key has expired.", key.id)
        return key


def require_role(key: Key, roles: Iterable[Role]) -> None:
    allowed = tuple(roles)
    if key.role not in allowed:
        raise PermissionDeniedError(
            f"This operation needs a key with role {' or '.join(allowed)}.",
            code="role_not_permitted",
        )


def require_model(key: Key, model: str) -> None:
    if not key.may_use(model):
        raise PermissionDeniedError(
            "This API key may not use the requested model.",
            param="model",
            code="model_not_permitted",
        )


@dataclass
class _Bucket:
    capacity: float
    level: float
    updated: float

    def refill(self, now: float) -> None:
        rate = self.capacity / 60.0
        self.level = min(self.capacity, self.level + (now - self.updated) * rate)
        self.updated = now

    def wait_for(self, amount: float) -> int:
        """Whole seconds until ``amount`` is available."""
        return max(1, math.ceil((amount - self.level) / (self.capacity / 60.0)))


@dataclass
class RateLimiter:
    """Requests/min and tokens/min per key. A request is admitted when one request and
    one token are left; its tokens are charged when it ends, so a long answer can take the
    token bucket below zero and the next request waits for it to refill."""

    clock: Callable[[], float] = time.monotonic
    _requests: dict[str, _Bucket] = field(default_factory=dict)
    _tokens: dict[str, _Bucket] = field(default_factory=dict)

    def admit(self, key: Key) -> None:
        now = self.clock()
        waits = []
        requests = self._bucket(self._requests, key.id, key.rpm, now)
        tokens = self._bucket(self._tokens, key.id, key.tpm, now)
        if requests is not None and requests.level < 1:
            waits.append(requests.wait_for(1))
        if tokens is not None and tokens.level < 1:
            waits.append(tokens.wait_for(1))
        if waits:
            kind = "tokens" if tokens is not None and tokens.level < 1 else "requests"
            raise RateLimitError(
                f"Rate limit reached for this API key ({kind} per minute); retry later.",
                retry_after=max(waits),
            )
        if requests is not None:
            requests.level -= 1

    def charge(self, key: Key, tokens: int) -> None:
        bucket = self._bucket(self._tokens, key.id, key.tpm, self.clock())
        if bucket is not None:
            bucket.level -= tokens

    @staticmethod
    def _bucket(
        buckets: dict[str, _Bucket], key_id: str, per_minute: int | None, now: float
    ) -> _Bucket | None:
        if not per_minute:
            return None
        bucket = buckets.get(key_id)
        if bucket is None or bucket.capacity != per_minute:
            bucket = buckets[key_id] = _Bucket(float(per_minute), float(per_minute), now)
        bucket.refill(now)
        return bucket
