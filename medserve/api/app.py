"""The application factory: settings, router and audit store in, a FastAPI app out.

Everything the app uses lives on ``app.state`` (settings, router, auditor); nothing is
global, so tests build as many apps as they like. The lifespan sets the offline
environment, opens the audit log, loads every model before the first request is accepted,
records the start, and on shutdown records the stop, unloads the models and closes the log.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from medserve import __version__, audit
from medserve.api.audit import Auditor
from medserve.api.exchange import exchange
from medserve.api.middleware import RequestContext
from medserve.api.routes import router as routes
from medserve.api.security import Security
from medserve.api.validation import validation_error
from medserve.config import Settings
from medserve.errors import (
    InvalidRequestError,
    MedserveError,
    MethodNotAllowedError,
    NotFoundError,
    envelope,
    headers,
)
from medserve.fallback import ENGINE_HEADER, FALLBACK_HEADER
from medserve.metrics import Metrics
from medserve.privacy import EgressGuard, apply_offline_env
from medserve.registry import served_models
from medserve.router import Router, Served

log = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    router: Router | None = None,
    store: audit.AuditStore | None = None,
    guard: EgressGuard | None = None,
) -> FastAPI:
    """Build the app. ``router`` defaults to the models the settings name; ``store`` to
    the configured audit log, opened at start-up (the CLI opens it first, to report a
    problem with the log or its keys before anything else starts). ``guard``, the
    process's egress guard (installed by the CLI), reports refusals to the metrics and
    the audit log."""
    router = router or Router.from_specs(served_models(settings))
    conf = settings.audit
    auditor = Auditor(conf, settings.instance)
    metrics = Metrics(settings.instance)
    security = Security(settings.auth)
    metrics.declare(s.spec.id for s in router)
    metrics.declare_replicas(router.replicas())
    if guard is not None:

        def refused(host: str) -> None:
            metrics.egress_refusals.inc()
            auditor.event_later("egress.refused", host=host)

        guard.on_refusal = refused
    metrics.watch_audit(lambda: auditor.store.stats if auditor.store is not None else None)
    security.watch(metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        apply_offline_env(os.environ)
        if conf.enabled:
            auditor.attach(
                store or audit.open_configured(conf, settings.instance), audit.content_cipher(conf)
            )
            assert auditor.store is not None
            auditor.store.on_commit = metrics.audit_write.observe
        try:
            await auditor.event("config.loaded", **_posture(settings, router))
            await security.start()
            await router.start()
            journal = asyncio.create_task(security.audit_key_changes(auditor, settings.instance))
            refresh = asyncio.create_task(security.refresh_keys())
            try:
                await auditor.event("server.start", version=__version__)
                yield
            finally:
                journal.cancel()
                refresh.cancel()
                await auditor.event("server.stop")
                await router.close()
        finally:
            await security.aclose()
            if auditor.store is not None:
                auditor.store.close()

    app = FastAPI(
        title="medserve",
        version=__version__,
        summary="OpenAI-compatible inference for medical LLMs, on premises.",
        lifespan=lifespan,
        # The docs pages load their JavaScript from a public CDN: a browser opening them
        # would reach the internet from inside the hospital. /openapi.json stays.
        docs_url=None,
        redoc_url=None,
        # A redirect to the path with(out) its trailing slash takes its Location from the
        # client's Host header: a 404 tells the client the same without echoing it.
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.state.router = router
    app.state.auditor = auditor
    app.state.metrics = metrics
    app.state.security = security
    app.state.draining = False
    app.include_router(routes)
    app.add_middleware(
        RequestContext,
        max_body_bytes=settings.max_body_bytes,
        auditor=auditor,
        metrics=metrics,
        security=security,
        body_timeout_s=settings.body_timeout_s,
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            # Readable by the page's script: which engine answered, and whether it was a
            # fallback engine (other weights), which a clinical app may want to show.
            expose_headers=[ENGINE_HEADER, FALLBACK_HEADER],
        )
    _add_error_handlers(app)
    return app


def _posture(settings: Settings, router: Router) -> dict[str, Any]:
    """What the audit log records about the configuration: no secrets, no key material."""
    conf = settings.audit
    return {
        "host": settings.host,
        "port": settings.port,
        "models": [_model_posture(s) for s in router],
        "audit_on_failure": conf.on_failure,
        "audit_capture": conf.capture,
        "auth": settings.auth.enabled,
        # Where keys and limits live, never the connection string: "postgresql" (shared
        # by every gateway on it, with the revocation bound) or "sqlite" (this process).
        "keys_store": "postgresql" if settings.auth.url is not None else "sqlite",
        "revocation_bound_s": settings.auth.stale_after_s if settings.auth.url else None,
        "metrics_access": settings.auth.metrics,
        "tls": settings.tls_certfile is not None,
        "egress_allow": settings.egress_allow,
        "max_body_bytes": settings.max_body_bytes,
    }


def _model_posture(served: Served) -> dict[str, Any]:
    """A model in the ``config.loaded`` event: id, engine kind, and its fallback engines
    (replica names) when it has any started."""
    posture: dict[str, Any] = {"id": served.spec.id, "engine": served.kind}
    fallback = [served.replica_name(e) for e in served.engines if served.is_fallback(e)]
    if fallback:
        posture["fallback"] = fallback
    return posture


def error_response(exc: MedserveError) -> JSONResponse:
    """The one mapping from an error to its HTTP response."""
    return JSONResponse(envelope(exc), status_code=exc.status, headers=headers(exc))


def _add_error_handlers(app: FastAPI) -> None:
    def respond(request: Request, exc: MedserveError) -> JSONResponse:
        exchange(request).failed(exc)
        return error_response(exc)

    async def on_medserve(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, MedserveError)
        return respond(request, exc)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        if _body_not_json(request, exc):
            return respond(request, InvalidRequestError(NOT_JSON))
        return respond(request, validation_error(exc))

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            return respond(request, NotFoundError("No such route."))
        if exc.status_code == 405:
            response = respond(request, MethodNotAllowedError("Method not allowed for this route."))
            # RFC 9110: a 405 lists the methods the route has.
            response.headers.update({k: v for k, v in (exc.headers or {}).items() if k == "Allow"})
            return response
        if exc.status_code == 400:  # FastAPI could not decode the body (not UTF-8 JSON)
            return respond(request, InvalidRequestError("The request body is not valid JSON."))
        if exc.status_code < 500:
            return respond(request, InvalidRequestError("The request could not be processed."))
        return respond(request, MedserveError("Internal server error."))

    app.add_exception_handler(MedserveError, on_medserve)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)
    # Any other exception is answered by RequestContext (medserve.api.middleware), inside
    # which the response still gets its headers and audit record.


NOT_JSON = "The request body must be JSON, sent with `Content-Type: application/json`."


def _body_not_json(request: Request, exc: RequestValidationError) -> bool:
    """The body as a whole failed and was not sent as JSON (e.g. ``curl -d``'s form type):
    name the real problem rather than "must be a JSON object"."""
    whole = any(tuple(e.get("loc", ())) == ("body",) for e in exc.errors())
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return whole and not (kind == "application/json" or kind.endswith("+json"))
