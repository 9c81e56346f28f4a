"""The server's side of the audit log: HTTP exchanges in, durable records out.

Which requests leave a record: every request except the liveness/readiness probes (and
the metrics scrape), including refused ones (400, 404, 413, 401...) and unmatched paths,
because probing is itself worth auditing.

When: a generation's record is committed before its response completes: before the JSON
body of a non-streaming response, before ``[DONE]`` of a stream. Every other response's
record is committed before its last body byte is sent. A request whose client left first
is recorded afterwards (status 499).

On a failed write, ``on_failure = "closed"`` (the default) refuses: a generation that
cannot be recorded is answered 503 ``audit_unavailable`` instead of its completion, and
from then on every audited request is refused up front (nothing is generated) until a
record commits again; the refusals' own records are those probes, so the first refusal
recorded after the log recovers re-opens the server. With ``"open"`` the server keeps
answering and every lost record is counted and logged.

Recovery needs no restart: after a failed write the store opens a new connection for the
next record, proves it writable and continues the chain from the file's last record (see
:mod:`medserve.audit.store`). A readiness probe that finds the log failing asks the store
to try at once, so a server that a load balancer stopped sending traffic to comes back
too. Records of requests refused or lost meanwhile stay refused or lost: none is retried.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from medserve.api.exchange import Exchange
from medserve.audit import (
    AuditStore,
    AuditWriteError,
    ChainKeys,
    ContentCipher,
    EventFacts,
    RequestFacts,
)
from medserve.audit.store import sha256_hex
from medserve.config import AuditSettings
from medserve.errors import UnavailableError

log = logging.getLogger(__name__)

UNAUDITED_PATHS = frozenset({"/health", "/ready", "/metrics"})


class Auditor:
    """Builds records from exchanges and writes them; a no-op when audit is off."""

    def __init__(self, settings: AuditSettings, instance: str) -> None:
        self.settings = settings
        self.instance = instance
        self.store: AuditStore | None = None
        self.keys: ChainKeys | None = None
        self.cipher: ContentCipher | None = None
        self.lost = 0  # records that could not be written (fail-open or not)

    def attach(self, store: AuditStore, cipher: ContentCipher | None) -> None:
        """Start auditing into ``store`` (opened); ``cipher`` when content capture is on."""
        self.store, self.keys, self.cipher = store, store.keys, cipher

    @property
    def enabled(self) -> bool:
        return self.store is not None

    def audits(self, path: str) -> bool:
        return self.enabled and path not in UNAUDITED_PATHS

    def hash_text(self, data: bytes) -> str | None:
        return self.keys.text_hmac(data) if self.keys is not None else None

    def _user_hmac(self, user: str | None) -> str | None:
        """The keyed hash of OpenAI's free-text ``user`` (it may name a patient)."""
        if user is None:
            return None
        # surrogatepass: a JSON body may hold a lone surrogate ("\ud800"); hash it anyway.
        return self.hash_text(user.encode("utf-8", "surrogatepass"))

    def refusal(self) -> UnavailableError | None:
        """The 503 to answer now if the log is failing and the server fails closed."""
        if self.store is None or self.settings.on_failure != "closed" or self.store.available():
            return None
        return UnavailableError(
            "The audit log cannot be written, so this server is not taking requests.",
            code="audit_unavailable",
            retry_after=self.settings.retry_after_s,
        )

    def health(self) -> dict[str, Any]:
        """For /ready: whether requests can be recorded, and counts (no data)."""
        if self.store is None:
            return {"ok": True, "enabled": False}
        writable = self.store.available()
        if not writable:
            self.store.recover()  # the next probe sees the outcome
        return {
            "ok": writable or self.settings.on_failure == "open",
            "enabled": True,
            "writable": writable,
            "last_seq": self.store.stats.last_seq,
            "lost": self.lost,
        }

    def facts(self, ex: Exchange) -> RequestFacts:
        return RequestFacts(
            request_id=ex.request_id,
            method=ex.method,
            endpoint=ex.endpoint,
            status=ex.status,
            client=ex.client,
            key_id=ex.key_id,
            user_hmac=self._user_hmac(ex.user),
            model=ex.model,
            engine=ex.engine,
            instance=self.instance,
            replica=ex.replica,
            attempts=ex.attempts or None,
            fallback=ex.fallback,
            weights_sha256=ex.weights_sha256,
            error=ex.error,
            stream=ex.stream,
            prompt_tokens=ex.prompt_tokens,
            completion_tokens=ex.completion_tokens,
            latency_ms=ex.latency_ms(),
            finish_reason=ex.finish_reason,
            prompt_hmac=ex.prompt_hmac,
            completion_hmac=ex.completion_hmac,
            content_sha256=ex.content_sha256,
            constraint=ex.constraint,
            schema_sha256=ex.schema_sha256,
            tools=ex.tools,
            tools_sha256=ex.tools_sha256,
        )

    async def generation(self, ex: Exchange, prompt: bytes, completion: str) -> None:
        """Commit a finished generation's record; in closed mode a failure raises 503."""
        if self.store is None:
            return
        ex.status = ex.status or 200
        ex.completion_hmac = self.hash_text(completion.encode())
        sealed = None
        if self.cipher is not None:
            content = json.dumps({"prompt": prompt.decode(), "completion": completion})
            sealed = self.cipher.seal(content.encode(), ex.request_id)
            ex.content_sha256 = sha256_hex(sealed)
        ex.audited = True
        try:
            await self.store.append(self.facts(ex), sealed)
        except AuditWriteError:
            self._lost(ex)
            if self.settings.on_failure == "closed":
                ex.status = 503
                raise UnavailableError(
                    "The audit log cannot be written; the response was withheld.",
                    code="audit_unavailable",
                    retry_after=self.settings.retry_after_s,
                ) from None

    async def request(self, ex: Exchange) -> None:
        """Commit the record of a response about to complete. Never raises."""
        if self.store is None or ex.audited:
            return
        ex.audited = True
        try:
            await self.store.append(self.facts(ex))
        except AuditWriteError:
            self._lost(ex)

    def request_later(self, ex: Exchange) -> None:
        """Queue the record of a request that ended without a response (client gone)."""
        if self.store is None or ex.audited:
            return
        ex.audited = True
        self.store.submit(self.facts(ex), on_lost=lambda: self._lost(ex))

    async def event(self, name: str, /, **details: Any) -> bool:
        """Record an administrative or security event (start, stop, config, keys); True
        once committed, False when the record was lost (counted and logged)."""
        if self.store is None:
            return False
        try:
            await self.store.append(EventFacts(name, self.instance, details))
        except AuditWriteError:
            self.lost += 1
            log.error("audit record lost", extra={"event": name})
            return False
        return True

    def event_later(self, name: str, /, **details: Any) -> None:
        """Queue an event record without waiting (from sync code, any thread)."""
        if self.store is not None:
            self.store.submit(EventFacts(name, self.instance, details))

    def _lost(self, ex: Exchange) -> bool:
        self.lost += 1
        log.error("audit record lost", extra={"request_id": ex.request_id})
        return True
