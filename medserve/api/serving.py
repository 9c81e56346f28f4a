"""One serving entry per endpoint: resolve → validate → admit → generate → audit.

:func:`chat_completions` and :func:`completions` take the parsed wire body and own the whole
request: the key may use the model and is within its rate, the model-level checks (refused
parameters, ``max_messages``) and the parse into the engine's frozen
:class:`GenerationRequest` ("parse, don't validate"), the router's admission permit, the
engine's stream, and the audit calls (the prompt's keyed hash; the durable record before
the response completes).

The commit point is the first chunk: the permit is taken and the engine's first chunk
pulled before any response byte, so a full queue (503 + ``Retry-After``), a prompt that
does not fit (400, rendered inside the engine) or a timeout while rendering (504) get their
own status, streaming or not. Both response shapes come from the same chunk stream: a
non-streaming response drains it. The permit is held until the response ends, however it
ends (finished, failed, client gone).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from contextlib import AsyncExitStack, aclosing
from typing import Literal, TypeVar

import anyio
from fastapi.responses import JSONResponse, Response
from starlette.requests import Request

from medserve.api.answers import Answer, Events, Job, Kind
from medserve.api.exchange import Exchange, exchange
from medserve.api.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    Usage,
)
from medserve.api.security import principal, role
from medserve.api.sse import EventStream
from medserve.api.structured import chat_messages, chat_structure, completion_logprobs
from medserve.audit.record import chat_input, chat_message
from medserve.auth import require_model
from medserve.config import ModelSpec
from medserve.engines.base import Engine, GenerationChunk, GenerationRequest, Sampling
from medserve.errors import (
    ContextLengthError,
    EngineError,
    InvalidRequestError,
    MedserveError,
    OverloadedError,
    RequestTimeoutError,
    UnavailableError,
    UnsupportedParameterError,
    envelope,
)
from medserve.fallback import ENGINE_HEADER, FALLBACK_HEADER
from medserve.health import Outcome
from medserve.router import Router, Served

log = logging.getLogger(__name__)

# llama.cpp reads seed 0xFFFFFFFF as "pick a random seed"; stay below it.
SEED_RANGE = 0xFFFFFFFF
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection first"
# OpenAI's default budget for the legacy endpoint when the client sent no max_tokens.
COMPLETION_DEFAULT_MAX_TOKENS = 16
T = TypeVar("T")


async def chat_completions(body: ChatCompletionRequest, http: Request) -> Response:
    """``POST /v1/chat/completions``: the whole request (see the module docstring)."""
    served = await _resolve(http, body)
    salt = _cache_salt(served.spec, http)
    return await _serve(chat_job(body, served, *_arrival(http), salt), served, http)


async def completions(body: CompletionRequest, http: Request) -> Response:
    """``POST /v1/completions``: the whole request (see the module docstring)."""
    served = await _resolve(http, body)
    salt = _cache_salt(served.spec, http)
    return await _serve(completion_job(body, served, *_arrival(http), salt), served, http)


async def _resolve(http: Request, body: ChatCompletionRequest | CompletionRequest) -> Served:
    """The served model, with what the audit record and the access log need to know."""
    ex = exchange(http)
    ex.endpoint = http.scope["route"].path
    ex.user, ex.stream = body.user, bool(body.stream)
    key = role(http, ("user", "admin"))
    require_model(key, body.model)  # before the lookup: no probing for model names
    await http.app.state.security.admit(key)
    router: Router = http.app.state.router
    served = router.get(body.model)
    ex.model, ex.engine = served.spec.id, served.kind
    return served


def _cache_salt(spec: ModelSpec, http: Request) -> str | None:
    """``GenerationRequest.cache_salt`` for the request's key: the key's id when the model
    isolates its prefix cache per key (``cache_isolation = "key"``), else None (shared).

    Issued keys' ids are 12 hex digits; the dev key's is ``dev`` and, with auth off, every
    request is ``anonymous`` (:data:`medserve.api.security.ANONYMOUS`): one salt for all,
    as shared. The id names no patient and is already in the audit record; it goes to the
    engine (and to a vLLM replica's request body) and is logged nowhere new."""
    return principal(http).id if spec.cache_isolation == "key" else None


def _arrival(http: Request) -> tuple[str, float]:
    """The exchange's request id and its arrival (time.monotonic())."""
    ex = exchange(http)
    return ex.request_id, time.monotonic() - (time.perf_counter() - ex.started)


def _refuse(param: str, what: str) -> UnsupportedParameterError:
    return UnsupportedParameterError(
        f"`{param}` is not supported by medserve: {what}.", param=param
    )


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return tuple(s for s in ([stop] if isinstance(stop, str) else stop) if s)


def _sent(body: ChatCompletionRequest | CompletionRequest, *names: str) -> tuple[str, int] | None:
    """The first of ``names`` the client sent (not null), with its value."""
    for name in names:
        value = getattr(body, name)
        if name in body.model_fields_set and value is not None:
            return name, int(value)
    return None


def _sampling(
    body: ChatCompletionRequest | CompletionRequest,
    spec: ModelSpec,
    requested: tuple[str, int] | None,
    default_max_tokens: int,
) -> Sampling:
    """Request values, else the model's defaults. ``requested``: the budget the client
    sent as (its field, its value), or None for ``default_max_tokens`` cut to fit."""
    d = spec.defaults
    return Sampling(
        max_tokens=None if requested is None else requested[1],
        max_tokens_param="max_tokens" if requested is None else requested[0],
        default_max_tokens=default_max_tokens,
        temperature=d.temperature if body.temperature is None else body.temperature,
        top_p=d.top_p if body.top_p is None else body.top_p,
        top_k=d.top_k if body.top_k is None else body.top_k,
        min_p=d.min_p if body.min_p is None else body.min_p,
        repeat_penalty=d.repeat_penalty if body.repeat_penalty is None else body.repeat_penalty,
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        seed=secrets.randbelow(SEED_RANGE) if body.seed is None else body.seed % SEED_RANGE,
        stop=_stops(body.stop),
    )


def _common_checks(body: ChatCompletionRequest | CompletionRequest) -> None:
    if body.n is not None and body.n > 1:
        raise _refuse("n", "one choice per request; send several requests instead")
    if body.logit_bias:
        raise _refuse("logit_bias", "token biases are not implemented")
    if body.stream_options is not None and not body.stream:
        raise InvalidRequestError(
            "`stream_options` is only allowed when `stream` is true.", param="stream_options"
        )


def _bound_messages(served: Served, count: int) -> None:
    """Refuse, before any engine work, more messages than can fit: at most ``max_messages``
    (ModelSpec) and at most the largest ``context_length`` of the model's engines, since
    every message renders to at least one token. Raises ContextLengthError (400
    ``context_length_exceeded``, ``messages``)."""
    context = max(e.info.context_length for e in served.engines)
    cap = min(served.spec.max_messages, context)
    if count > cap:
        raise ContextLengthError(
            f"The request has {count} messages; this model takes at most {cap} "
            f"(its context window is {context} tokens).",
            param="messages",
        )


def chat_job(
    body: ChatCompletionRequest,
    served: Served,
    request_id: str,
    arrived: float,
    cache_salt: str | None = None,
) -> Job:
    """Parse a chat request into a Job, or raise the 400 that names the bad parameter.

    ``arrived`` (time.monotonic() at the request's arrival) starts the model's
    ``timeout_s``, so rendering (in the engine) and waiting count. ``cache_salt`` goes
    into the request as is (see :func:`_cache_salt`).
    """
    _common_checks(body)
    structure = chat_structure(body)
    _bound_messages(served, len(body.messages))
    messages = chat_messages(body.messages)
    requested = _sent(body, "max_completion_tokens", "max_tokens")
    sampling = _sampling(body, served.spec, requested, served.spec.defaults.max_tokens)
    request = GenerationRequest(
        request_id=request_id,
        model=served.spec.id,
        sampling=sampling,
        messages=messages,
        user=body.user,
        deadline=arrived + served.spec.timeout_s,
        cache_salt=cache_salt,
        constraint=structure.constraint,
        tools=structure.tools,
        tool_choice=structure.tool_choice,
        logprobs=structure.logprobs,
    )
    audit_input = chat_input(
        [
            chat_message(
                m.role,
                m.content,
                [(c.id, c.name, c.arguments) for c in m.tool_calls],
                m.tool_call_id,
            )
            for m in messages
        ]
    )
    return _job("chat", body, request, audit_input)


def completion_job(
    body: CompletionRequest,
    served: Served,
    request_id: str,
    arrived: float,
    cache_salt: str | None = None,
) -> Job:
    """Parse a legacy completion request into a Job (``arrived``, ``cache_salt``: as for
    chat)."""
    _common_checks(body)
    if body.best_of is not None and body.best_of > 1:
        raise _refuse("best_of", "one candidate per request")
    if body.echo:
        raise _refuse("echo", "the prompt is not echoed back")
    if body.suffix:
        raise _refuse("suffix", "fill-in-the-middle is not implemented")
    for name in ("response_format", "tools", "tool_choice", "top_logprobs"):
        if getattr(body, name) is not None:
            raise _refuse(name, "a chat parameter, not on /v1/completions")
    if isinstance(body.prompt, str):
        text = body.prompt
    elif len(body.prompt) == 1 and isinstance(body.prompt[0], str):
        text = body.prompt[0]
    else:
        raise _refuse("prompt", "give one prompt as a string (no batches, no token arrays)")
    # OpenAI's default of 16 when the client sent no max_tokens: cut to fit, as in chat.
    requested = _sent(body, "max_tokens")
    sampling = _sampling(body, served.spec, requested, COMPLETION_DEFAULT_MAX_TOKENS)
    request = GenerationRequest(
        request_id=request_id,
        model=served.spec.id,
        sampling=sampling,
        prompt=text,
        user=body.user,
        deadline=arrived + served.spec.timeout_s,
        cache_salt=cache_salt,
        logprobs=completion_logprobs(body),
    )
    return _job("completion", body, request, text.encode())


def _job(
    kind: Kind,
    body: ChatCompletionRequest | CompletionRequest,
    request: GenerationRequest,
    audit_input: bytes,
) -> Job:
    return Job(
        kind=kind,
        request=request,
        stream=bool(body.stream),
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        created=int(time.time()),
        audit_input=audit_input,
    )


async def _serve(job: Job, served: Served, http: Request) -> Response:
    """Admit, generate up to the commit point, answer; the permit lives with the response."""
    ex = exchange(http)
    ex.prompt_hmac = http.app.state.auditor.hash_text(job.audit_input)
    ex.structured(job.request)
    try:
        attempt = await _commit(job, served, http)
        if attempt is None:
            return Response(status_code=CLIENT_CLOSED)
        held, chunks, first = attempt
        announce = _announce(ex)
        if job.stream:
            # The response owns the permit and the stream from here on.
            return EventStream(stream(job, first, chunks, http), held, headers=announce)
        try:
            gone, result = await _watching(http, complete(job, first, chunks, http))
        finally:
            with anyio.CancelScope(shield=True):
                await held.aclose()
    except MedserveError as exc:
        if exc.prompt_tokens is not None:  # rendering was work: charged to the key
            http.app.state.security.charge(principal(http), exc.prompt_tokens)
        raise
    if gone or result is None:
        return Response(status_code=CLIENT_CLOSED)
    return JSONResponse(result.model_dump(), headers=announce)


def _announce(ex: Exchange) -> dict[str, str]:
    """The headers that say which engine answered: ``X-Medserve-Engine`` (its replica name,
    ``KIND:INDEX`` as in the audit record) always, ``X-Medserve-Fallback`` (its engine
    kind) when it is a fallback engine, whose weights differ from the replicas'."""
    headers = {ENGINE_HEADER: ex.replica or ""}
    if ex.fallback:
        headers[FALLBACK_HEADER] = ex.engine or ""
    return headers


Attempt = tuple[AsyncExitStack, AsyncIterator[GenerationChunk], GenerationChunk | None]


async def _commit(job: Job, served: Served, http: Request) -> Attempt | None:
    """Take a permit and pull the engine's first chunk: (the permit and engine stream to
    close when done, the stream, its first chunk), or None if the client left first.

    Before that first chunk nothing was sent, so a replica fault (:data:`FAILOVER`: full,
    failed, unreachable, no first event in time) releases that replica and tries the next
    one the router offers: at most one attempt per engine, none after the request's
    deadline; with the model's ``replica_failover`` off, no other engine of the same tier
    (replica or fallback). The router offers fallback engines only when the key allows
    it (``Key.fallback``) and no replica can take the request. When no attempt is left, or
    the router refuses another (the rest full, unhealthy or gone), the last fault is the
    answer. Client errors (400) and client disconnects never fail over. ``ex.attempts``
    counts the engines asked; each attempt's outcome goes to the router (:func:`_outcome`:
    never a client's error or cancel) and to the metrics; ``ex.fallback`` and
    ``ex.weights_sha256`` describe the engine that answers.
    """
    ex = exchange(http)
    router: Router = http.app.state.router
    allow_fallback = principal(http).fallback
    tried: list[Engine] = []
    fault: MedserveError | None = None  # the last replica fault
    while True:
        held = AsyncExitStack()
        try:
            engine = await held.enter_async_context(
                router.admit(served, exclude=_excluded(served, tried), fallback=allow_fallback)
            )
        except MedserveError:
            if fault is None:
                raise
            raise fault from None  # the rest are full or gone: answer what the last said
        try:
            tried.append(engine)
            ex.attempts = len(tried)
            index = served.engines.index(engine)
            ex.engine, ex.replica = served.replica_kind(index), served.replica_name(engine)
            ex.fallback, ex.weights_sha256 = served.is_fallback(engine), engine.info.weights_sha256
            chunks = await held.enter_async_context(aclosing(engine.generate(job.request)))
            gone, first = await _watching(http, anext(chunks, None))
        except BaseException as exc:
            # Reported while the permit is held, so that a half-open breaker's trial is
            # settled by its outcome before the permit gives the trial back.
            _attempted(http, served, engine, _outcome(exc))
            with anyio.CancelScope(shield=True):
                await held.aclose()
            if not isinstance(exc, FAILOVER) or not _may_retry(job, served, tried):
                raise
            fault = exc
            log.warning(
                "replica failed before the first chunk; failing over",
                extra={"request_id": job.request.request_id, "replica": ex.replica},
            )
            continue
        # An engine stream that ends without a single chunk broke the engine contract.
        _attempted(http, served, engine, "cancelled" if gone else "ok" if first else "fault")
        if gone:
            with anyio.CancelScope(shield=True):
                await held.aclose()
            return None
        return held, chunks, first


# Replica faults before the commit point: another replica may answer. InvalidRequestError
# (the client's fault) is deliberately absent, and so is a client that left (cancelled).
FAILOVER = (OverloadedError, EngineError, UnavailableError, RequestTimeoutError)
# What one attempt came to, for the router and the metrics (bounded label values).
AttemptOutcome = Literal["ok", "fault", "busy", "client_error", "cancelled"]
REPORTED: dict[AttemptOutcome, Outcome] = {"ok": "ok", "fault": "fault", "busy": "busy"}


def _outcome(exc: BaseException) -> AttemptOutcome:
    """What an attempt that raised ``exc`` before its first chunk says about its replica.

    A full replica (503/429) is ``busy``; a 4xx is the client's (``client_error``); any
    other error is a replica ``fault`` (5xx, unreachable, an error event, no first event
    in time: a timeout counts even when the request's own deadline cut it short, since a
    replica that never answers must open its breaker); a cancellation (the client left,
    the server stops) is ``cancelled``.
    """
    if isinstance(exc, OverloadedError):
        return "busy"
    if isinstance(exc, MedserveError):
        return "client_error" if exc.status < 500 else "fault"
    return "fault" if isinstance(exc, Exception) else "cancelled"


def _attempted(http: Request, served: Served, engine: Engine, outcome: AttemptOutcome) -> None:
    """Count one attempt in the metrics and tell the router what it says about the
    replica: only ok, fault and busy are the replica's doing."""
    index = served.engines.index(engine)
    http.app.state.metrics.attempt(
        served.spec.id,
        served.replica_kind(index),
        served.replica_name(engine),
        outcome,
        fallback=served.is_fallback(engine),
    )
    reported = REPORTED.get(outcome)
    if reported is not None:
        router: Router = http.app.state.router
        router.report(engine, reported)


def _excluded(served: Served, tried: list[Engine]) -> list[Engine]:
    """The engines a failing-over request may not ask: those it tried and, when the
    model's ``replica_failover`` is off, every engine of a tier (replicas, fallback
    engines) where one already failed."""
    if served.spec.replica_failover:
        return tried
    tiers = {served.is_fallback(e) for e in tried}
    return [e for e in served.engines if served.is_fallback(e) in tiers]


def _may_retry(job: Job, served: Served, tried: list[Engine]) -> bool:
    """Whether another engine of ``served`` is left to ask and the deadline is not past."""
    deadline = job.request.deadline
    if deadline is not None and time.monotonic() >= deadline:
        return False
    return len(tried) < len(served.engines)


async def _watching(http: Request, work: Awaitable[T]) -> tuple[bool, T | None]:
    """Await ``work``, cancelling it if the client disconnects first: (gone, its result)."""
    result: T | None = None
    with anyio.CancelScope() as scope:
        watcher = asyncio.create_task(_cancel_on_disconnect(http, scope))
        try:
            result = await work
        finally:
            watcher.cancel()
    return scope.cancelled_caught, result


async def _cancel_on_disconnect(http: Request, scope: anyio.CancelScope) -> None:
    # The body has been read, so the next ASGI message is the disconnect.
    while (await http.receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def complete(
    job: Job,
    first: GenerationChunk | None,
    chunks: AsyncIterator[GenerationChunk],
    http: Request,
) -> ChatCompletion | Completion | None:
    """Drain the engine's stream (``first``, pulled at the commit point, then ``chunks``)
    into one response (:meth:`Answer.response`); None if it ended without a last chunk."""
    answer = Answer(job)
    last: GenerationChunk | None = None
    ex = exchange(http)
    chunk = first
    while chunk is not None:
        if answer.add(chunk):
            ex.token()
        last = chunk
        chunk = await anext(chunks, None)
    if last is None or last.finish_reason is None:
        return None
    usage = _finished(http, last)
    # The record is durable before the response exists; in fail-closed mode a failed
    # write raises the 503 that replaces it.
    await http.app.state.auditor.generation(ex, job.audit_input, answer.audited())
    return answer.response(last.finish_reason, usage)


def _finished(http: Request, chunk: GenerationChunk) -> Usage:
    """Note the last chunk's counts on the exchange; the usage block for the response."""
    ex = exchange(http)
    p, c = chunk.prompt_tokens or 0, chunk.completion_tokens or 0
    ex.prompt_tokens, ex.completion_tokens, ex.finish_reason = p, c, chunk.finish_reason
    ex.queue_s = chunk.queue_s
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


async def stream(
    job: Job,
    first: GenerationChunk | None,
    chunks: AsyncIterator[GenerationChunk],
    http: Request,
) -> AsyncGenerator[str, None]:
    """SSE ``data:`` payloads in OpenAI's chunk format (:class:`Events`), ending with
    ``[DONE]``.

    ``first`` is the engine's first chunk, pulled before the response started; the rest
    come from ``chunks``. ``[DONE]`` means the answer is complete and its audit record
    committed. Once the first byte is out, a failure can no longer change the status code;
    it is sent as an ``{"error": ...}`` event that ends the stream instead, with no
    ``[DONE]`` after it (engine error, timeout, failed audit write, unexpected exception).
    """
    events = Events(job)
    ex = exchange(http)
    answer = Answer(job)
    try:
        if events.chat:
            yield events.role()
        chunk = first
        while chunk is not None:
            if answer.add(chunk):
                ex.token()
                yield events.piece(
                    chunk.text,
                    extra=chunk.extra if events.chat else None,
                    tool_calls=chunk.tool_calls if events.chat else (),
                    logprobs=chunk.logprobs,
                )
            if chunk.finish_reason is not None:
                yield events.piece("", chunk.finish_reason)
                usage = _finished(http, chunk)
                if job.include_usage:
                    yield events.usage(usage)
            chunk = await anext(chunks, None)
        # Recorded before [DONE]: a client that saw the end of the stream has its record.
        await http.app.state.auditor.generation(ex, job.audit_input, answer.audited())
    except MedserveError as exc:
        ex.failed(exc)
        yield json.dumps(envelope(exc))
        return
    except Exception:
        # Headers are out, so no handler can turn this into a 500: say it in the stream.
        log.exception("stream failed", extra={"request_id": job.request.request_id})
        ex.error = MedserveError.type
        yield json.dumps(envelope(MedserveError("Internal server error.")))
        return
    yield "[DONE]"
