"""Per-request plumbing as one pure ASGI middleware: id, authentication, body limit,
headers, audit record, metrics, access log.

Pure ASGI rather than ``BaseHTTPMiddleware`` so streaming responses and disconnect
messages pass through untouched. The body of a POST is read here, up to the configured
limit, before the application sees it: a request over the limit gets 413 whether or not it
declared its length, and the application still reads it as usual. A body that has not
arrived in full within ``body_timeout_s`` gets 408 with ``Connection: close``.

Every request gets an :class:`Exchange`. Its API key is checked before anything else
(see :mod:`medserve.api.security`), and its audit record is committed before the last
byte of the response goes out (see :mod:`medserve.api.audit`). Metrics and the access log
read the finished exchange.

The access log names the route template (``/v1/models/{model_id}``), not the raw path, and
never the query string or body: both are client-controlled and may carry patient data.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from starlette.responses import JSONResponse
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from medserve.api.audit import Auditor
from medserve.api.exchange import Exchange
from medserve.api.security import Security
from medserve.errors import (
    AuthenticationError,
    BodyTimeoutError,
    InvalidRequestError,
    MedserveError,
    RequestTooLargeError,
    UnsupportedMediaTypeError,
    envelope,
    headers,
)
from medserve.metrics import Metrics, RequestObservation

log = logging.getLogger("medserve.access")

BODY_METHODS = {"POST", "PUT", "PATCH"}
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    # Responses may hold patient data: no cache, no proxy, no browser may keep them.
    (b"cache-control", b"no-store"),
    (b"referrer-policy", b"no-referrer"),
]
OURS = {b"x-request-id", *(name for name, _ in SECURITY_HEADERS)}


class RequestContext:
    """Assigns the request id, enforces the body limit, adds headers, audits, logs one line."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        auditor: Auditor,
        metrics: Metrics,
        security: Security,
        body_timeout_s: float = 30.0,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.auditor = auditor
        self.metrics = metrics
        self.security = security

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ex = Exchange.begin(scope)
        state = scope.setdefault("state", {})
        state["exchange"] = ex
        state["key"] = None
        audited = self.auditor.audits(scope["path"])
        id_header = (b"x-request-id", ex.request_id.encode())
        started = completed = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started, completed
            if message["type"] == "http.response.start":
                started = True
                ex.status = message["status"]
                # Ours replace any the response set itself: one value per header.
                kept = [h for h in message.get("headers", []) if h[0].lower() not in OURS]
                message["headers"] = [*kept, id_header, *SECURITY_HEADERS]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                if audited:
                    ex.endpoint = _endpoint(scope)
                    await self.auditor.request(ex)
                completed = True
            await send(message)

        try:
            try:
                state["key"] = key = self.security.authenticate(scope)
            except MedserveError as exc:  # 401: no key, or not a usable one
                # A revoked or expired key is identified (its secret matched): its id goes
                # into the refusal's record, so an auditor sees which key was tried.
                ex.key_id = exc.key_id if isinstance(exc, AuthenticationError) else None
                await _error(exc, ex)(scope, receive, send_with_headers)
                return
            ex.key_id = key.id if key is not None else None
            refusal = self.auditor.refusal() if audited else None
            if refusal is not None:
                await _error(refusal, ex)(scope, receive, send_with_headers)
                return
            if scope["method"] in BODY_METHODS:
                try:
                    body = await self._read_body(scope, receive)
                except MedserveError as exc:
                    await _error(exc, ex)(scope, receive, send_with_headers)
                    return
                if body is None:  # the client left before sending its body
                    ex.status = 499
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send_with_headers)
        except Exception:
            ex.status, ex.error = 500, MedserveError.type
            if started:  # too late for another response: the server closes the connection
                raise
            # Answered here rather than by an app-level handler, which would run outside
            # this middleware: the 500 gets the request id, the security headers and its
            # audit record like any other response. The log keeps the exception's type
            # and traceback, never its message (see medserve.logs).
            log.exception("unhandled error", extra={"request_id": ex.request_id})
            unexpected = MedserveError("Internal server error.")
            await _error(unexpected, ex)(scope, receive, send_with_headers)
        finally:
            ex.endpoint = _endpoint(scope)
            if audited and not completed:
                ex.status = 499 if ex.status < 500 else ex.status
                self.auditor.request_later(ex)
            self.security.charge(
                state["key"], (ex.prompt_tokens or 0) + (ex.completion_tokens or 0)
            )
            self.metrics.observe(_observation(ex))
            _log(ex)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        limit = self.max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
                # Decoding it is not implemented; read as is, it would be taken for JSON.
                raise UnsupportedMediaTypeError(
                    "Compressed request bodies are not supported; send plain JSON "
                    "(no Content-Encoding)."
                )
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    raise InvalidRequestError("Invalid Content-Length header.") from None
                if declared > limit:
                    raise _too_large(limit)
        body = bytearray()
        try:
            async with asyncio.timeout(self.body_timeout_s):  # the whole body, not each chunk
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    body += message.get("body", b"")
                    if len(body) > limit:
                        raise _too_large(limit)
                    if not message.get("more_body", False):
                        return bytes(body)
        except TimeoutError:
            raise BodyTimeoutError(
                f"The request body did not arrive within {self.body_timeout_s:g} seconds."
            ) from None


def _too_large(limit: int) -> RequestTooLargeError:
    return RequestTooLargeError(f"The request body is larger than the limit of {limit} bytes.")


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _error(exc: MedserveError, ex: Exchange) -> JSONResponse:
    ex.failed(exc)
    return JSONResponse(envelope(exc), status_code=exc.status, headers=headers(exc))


def _observation(ex: Exchange) -> RequestObservation:
    return RequestObservation(
        model=ex.model or "",  # set only once the model was found among the served ones
        endpoint=ex.endpoint,
        status=ex.status or 500,
        duration_s=ex.latency_ms() / 1000,
        generation=ex.prompt_tokens is not None,
        prompt_tokens=ex.prompt_tokens or 0,
        completion_tokens=ex.completion_tokens or 0,
        queue_s=ex.queue_s,
        error=ex.error,
        ttft_s=ex.ttft_s,
        token_gaps_s=ex.token_gaps_s,
        constraint=ex.constraint,
    )


def _endpoint(scope: Scope) -> str:
    """The route template (``/v1/models/{model_id:path}``), never the raw path.

    For a request answered before routing (401, 413), the template it would have matched.
    """
    route = scope.get("route") or _match(getattr(scope.get("app"), "routes", ()), scope)
    return getattr(route, "path", None) or "unmatched"


def _match(routes: Iterable[Any], scope: Scope) -> Any:
    for route in routes:
        if getattr(route, "path", None) is None:  # an included router: look inside
            # (FastAPI wraps included routers; their routes sit on `original_router`.)
            router = getattr(route, "original_router", route)
            inner = _match(getattr(router, "routes", ()), scope)
            if inner is not None:
                return inner
        elif route.matches(scope)[0] != Match.NONE:
            return route
    return None


def _log(ex: Exchange) -> None:
    extra: dict[str, Any] = {
        "request_id": ex.request_id,
        "method": ex.method,
        "route": ex.endpoint,
        "status": ex.status or 500,
        "duration_ms": ex.latency_ms(),
        "model": ex.model,
        "prompt_tokens": ex.prompt_tokens,
        "completion_tokens": ex.completion_tokens,
        "finish_reason": ex.finish_reason,
        "error": ex.error,
    }
    log.info("request", extra=extra)
