"""Thin HTTP handlers: generation goes to one serving entry per endpoint."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from medserve.api import serving
from medserve.api.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from medserve.api.security import principal, role
from medserve.auth import require_model
from medserve.errors import UnavailableError
from medserve.health import ReplicaView
from medserve.metrics import EngineState, Metrics
from medserve.router import Router, Served

log = logging.getLogger(__name__)
router = APIRouter()

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 415, 429, 503)
}


# Dependencies are `async def` although they never await: FastAPI runs a plain `def`
# dependency in a worker thread, a thread hand-off and two wake-ups per request (about 4%
# of the gateway's CPU at one request at a time, measured with py-spy).


async def get_router(request: Request) -> Router:
    router: Router = request.app.state.router
    return router


RouterDep = Annotated[Router, Depends(get_router)]


async def accepting(request: Request) -> None:
    """New generation requests are refused once the server drains for shutdown."""
    if request.app.state.draining:
        raise UnavailableError(
            "The server is shutting down; retry on another instance or shortly.",
            code="shutting_down",
            retry_after=int(request.app.state.settings.drain_timeout_s) or 1,
        )


Accepting = Depends(accepting)


@router.get("/health", include_in_schema=False)
async def health() -> dict[str, str]:
    """Liveness: the process answers. Says nothing about the models."""
    return {"status": "ok"}


@router.get("/metrics", include_in_schema=False)
async def metrics(models: RouterDep, request: Request) -> Response:
    """Prometheus exposition: medserve's own registry, engine state read now."""
    if not request.app.state.security.public("/metrics"):
        role(request, ("admin", "auditor"))
    registry: Metrics = request.app.state.metrics
    states = []
    for served in models:
        states.append(
            EngineState(
                model=served.spec.id,
                kinds=models.kinds(served),
                health=models.health(served),
                load_seconds=models.load_seconds.get(served.spec.id),
                prefix_cache=models.prefix_cache(served),
            )
        )
    registry.set_engines(states)
    registry.set_replicas(models.replicas())
    return Response(registry.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/ready", include_in_schema=False)
async def ready(models: RouterDep, request: Request) -> JSONResponse:
    """Readiness: every model has a replica that accepts requests, the audit log is
    writable (or the server is configured to fail open), and with keys in PostgreSQL
    their copy is fresh (``keys``: database without password, schema version, age).
    Each model lists its replicas' states (:func:`replica_report`); one replica down
    leaves its model ready. A model whose engines keep a prefix cache also has
    ``prefix_cache``: their counts added up
    (:class:`~medserve.engines.base.PrefixCacheStats`' fields). Asked without an API key
    (a probe), the same status code and only ``{"status": ...}``; a bad key is a 401."""
    report = []
    views = models.replicas()
    for served in models:
        h = models.health(served)
        cache = models.prefix_cache(served)
        report.append(
            {
                "id": served.spec.id,
                "ready": h.ready,
                "running": h.running,
                "waiting": h.waiting,
                "rejected": h.rejected,
                "replicas": [replica_report(v) for v in views if v.model == served.spec.id],
                **({"detail": h.detail} if h.detail else {}),
                **({"prefix_cache": asdict(cache)} if cache is not None else {}),
            }
        )
    draining = bool(request.app.state.draining)
    audit = request.app.state.auditor.health()
    keys = request.app.state.security.health()
    ok = bool(report) and all(m["ready"] for m in report) and not draining and audit["ok"]
    ok = ok and (keys is None or bool(keys["ok"]))
    status = "draining" if draining else "ready" if ok else "not_ready"
    if request.state.key is None:  # no key (a Kubernetes or load-balancer probe): status only
        body: dict[str, object] = {"status": status}
    else:
        body = {
            "status": status,
            "models": report,
            "audit": audit,
            **({"keys": keys} if keys else {}),
        }
    return JSONResponse(
        body,
        status_code=200 if ok else 503,
        headers=None if ok else {"Retry-After": "5"},
    )


def replica_report(view: ReplicaView) -> dict[str, object]:
    """One replica in /ready: ``name`` (kind:index), ``fallback`` (true: one of the
    model's fallback engines, not a replica), ``status`` (ready, ejected, down),
    ``breaker`` (closed, open, half_open), ``outstanding`` and ``faults`` (consecutive),
    and its last scraped ``waiting``/``running``/``kv_cache_usage`` (null: unknown)."""
    return {
        "name": view.name,
        "fallback": view.fallback,
        "status": view.status,
        "breaker": view.breaker,
        "outstanding": view.outstanding,
        "faults": view.faults,
        "waiting": view.waiting,
        "running": view.running,
        "kv_cache_usage": view.kv_cache_usage,
    }


def _card(models: Router, served: Served) -> ModelCard:
    """The model as /v1/models shows it: its first started replica's context window (a
    replica that is down does not know its own)."""
    info = models.started(served)[0].info
    return ModelCard(
        id=served.spec.id,
        created=0,
        owned_by=info.owned_by,
        engine=served.kind,
        context_length=info.context_length,
    )


@router.get("/v1/models", responses=ERRORS)
async def list_models(models: RouterDep, request: Request) -> ModelList:
    """The models this key may use."""
    key = principal(request)
    cards = [_card(models, models.get(s.spec.id)) for s in models if key.may_use(s.spec.id)]
    return ModelList(data=cards)


@router.get("/v1/models/{model_id:path}", responses=ERRORS)
async def get_model(model_id: str, models: RouterDep, request: Request) -> ModelCard:
    require_model(principal(request), model_id)
    return _card(models, models.get(model_id))


@router.post("/admin/drain", status_code=202, include_in_schema=False)
async def drain(request: Request) -> dict[str, str]:
    """Stop taking generation requests (503) so the process can be stopped or updated."""
    role(request, ("admin",))
    begin_drain(request.app)
    return {"status": "draining"}


def begin_drain(app: FastAPI) -> None:
    """Shutdown has begun: refuse new generation (503), let in-flight requests finish."""
    if not app.state.draining:
        app.state.draining = True
        log.info("draining", extra={"duration_ms": app.state.settings.drain_timeout_s * 1000})


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses=ERRORS,
    dependencies=[Accepting],
)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return await serving.chat_completions(body, request)


@router.post(
    "/v1/completions", response_model=Completion, responses=ERRORS, dependencies=[Accepting]
)
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await serving.completions(body, request)
