"""Per-request plumbing as one pure ASGI middleware: id, body limit, headers, access log.

Pure ASGI rather than ``BaseHTTPMiddleware`` so streaming responses and disconnect
messages pass through untouched. The body of a POST is read here, up to the configured
limit, before the application sees it: a request over the limit gets 413 whether or not it
declared its length, and the application still reads it as usual.

The access log names the route template (``/v1/models/{model_id}``), not the raw path, and
never the query string or body: both are client-controlled and may carry patient data.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from medserve.errors import InvalidRequestError, MedserveError, RequestTooLargeError, envelope

log = logging.getLogger("medserve.access")

BODY_METHODS = {"POST", "PUT", "PATCH"}
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    # Responses may hold patient data: no cache, no proxy, no browser may keep them.
    (b"cache-control", b"no-store"),
    (b"referrer-policy", b"no-referrer"),
]


class RequestContext:
    """Assigns the request id, enforces the body limit, adds headers, logs one line."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        started = time.perf_counter()
        status = 0
        id_header = (b"x-request-id", request_id.encode())

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), id_header, *SECURITY_HEADERS]
            await send(message)

        try:
            if scope["method"] in BODY_METHODS:
                try:
                    body = await self._read_body(scope, receive)
                except MedserveError as exc:
                    response = JSONResponse(envelope(exc), status_code=exc.status)
                    await response(scope, receive, send_with_headers)
                    return
                if body is None:  # the client left before sending its body
                    status = 499
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send_with_headers)
        finally:
            _log(scope, state, status or 500, started)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        limit = self.max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    raise InvalidRequestError("Invalid Content-Length header.") from None
                if declared > limit:
                    raise _too_large(limit)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > limit:
                raise _too_large(limit)
            if not message.get("more_body", False):
                return bytes(body)


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


def _log(scope: Scope, state: dict[str, Any], status: int, started: float) -> None:
    route = scope.get("route")
    usage = state.get("usage")
    extra: dict[str, Any] = {
        "request_id": state.get("request_id"),
        "method": scope["method"],
        "route": getattr(route, "path", None) or "unmatched",
        "status": status,
        "duration_ms": round((time.perf_counter() - started) * 1000, 1),
    }
    if "model" in state:
        extra["model"] = state["model"]
    if usage is not None:
        extra["prompt_tokens"] = usage.prompt_tokens
        extra["completion_tokens"] = usage.completion_tokens
    if "stream_error" in state:
        extra["stream_error"] = state["stream_error"]
    log.info("request", extra=extra)
