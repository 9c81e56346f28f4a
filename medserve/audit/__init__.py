"""The tamper-evident audit log: records, the SQLite and PostgreSQL stores, verification
and export.

Nothing here imports the web layer; the server's side of auditing (turning an HTTP
exchange into a record) is :mod:`medserve.api.audit`.
"""

from __future__ import annotations

from medserve.audit.keys import (
    AuditKeyError,
    ChainKeys,
    ContentCipher,
    load_or_create_secret,
    load_or_create_signing_key,
)
from medserve.audit.record import EventFacts, RequestFacts
from medserve.audit.store import (
    AuditError,
    AuditStore,
    AuditWriteError,
    SQLiteStore,
    prepare_directory,
)
from medserve.config import AuditSettings

__all__ = [
    "AuditError",
    "AuditKeyError",
    "AuditStore",
    "AuditWriteError",
    "ChainKeys",
    "ContentCipher",
    "EventFacts",
    "RequestFacts",
    "SQLiteStore",
    "chain_keys",
    "content_cipher",
    "open_configured",
    "open_store",
]


def chain_keys(settings: AuditSettings) -> ChainKeys:
    """The chain and text keys from the audit secret (created on first use)."""
    return ChainKeys.from_secret(load_or_create_secret(settings.key_path()))


def content_cipher(settings: AuditSettings) -> ContentCipher | None:
    """The content-capture cipher, or None when capture is off."""
    if not settings.capture or settings.capture_key_file is None:
        return None
    return ContentCipher(load_or_create_secret(settings.capture_key_file, "audit content key"))


def open_configured(settings: AuditSettings, instance: str) -> AuditStore:
    """The configured store, opened: SQLite at ``settings.path`` (:func:`open_store`), or
    PostgreSQL when ``settings.url`` is set, where ``instance`` (the gateway's name) names
    this gateway's chain (:mod:`medserve.audit.pgstore`). Raises :class:`AuditError` or
    :class:`AuditKeyError`; a message never holds the database password."""
    if settings.url is not None:
        return _open_postgres(settings, instance)
    return open_store(settings)


def open_store(settings: AuditSettings) -> SQLiteStore:
    """The SQLite store, opened: keys loaded (or created), head checked, writer running.

    Raises :class:`AuditError` or :class:`AuditKeyError` with a message that says what to fix
    (the log's directory is checked first: the keys live in it by default).
    """
    prepare_directory(settings.path)
    store = SQLiteStore(
        settings.path,
        chain_keys(settings),
        load_or_create_signing_key(settings.signing_key_path()),
        checkpoint_every=settings.checkpoint_every,
        checkpoint_interval_s=settings.checkpoint_interval_s,
        checkpoint_file=settings.checkpoint_file,
        busy_timeout_ms=settings.busy_timeout_ms,
    )
    store.open()
    return store


def _open_postgres(settings: AuditSettings, instance: str) -> AuditStore:
    try:
        import psycopg  # noqa: F401  (the driver: the `postgres` extra)

        from medserve.audit.pgstore import PgStore
    except ImportError:
        raise AuditError(
            "audit.url names a PostgreSQL database, but its driver is not installed: "
            "install medserve with the `postgres` extra (pip install 'medserve[postgres]')"
        ) from None
    assert settings.url is not None
    store = PgStore(
        settings.url.get_secret_value(),
        instance,
        chain_keys(settings),
        load_or_create_signing_key(settings.signing_key_path()),
        checkpoint_every=settings.checkpoint_every,
        checkpoint_interval_s=settings.checkpoint_interval_s,
        checkpoint_file=settings.checkpoint_file,
        gateway_role=settings.gateway_role,
        auditor_role=settings.auditor_role,
    )
    store.open()
    return store
