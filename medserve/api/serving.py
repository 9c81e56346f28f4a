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
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Mapping
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import anyio
from fastapi.responses import JSONResponse, Response
from starlette.requests import Request

from medserve.api.exchange import Exchange, exchange
from medserve.api.protocol import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessageIn,
    ChatMessageOut,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Usage,
)
from medserve.api.security import principal, role
from medserve.api.sse import EventStream
from medserve.audit.record import chat_input
from medserve.auth import require_model
from medserve.config import ModelSpec
from medserve.engines.base import Engine, GenerationChunk, GenerationRequest, Message, Sampling
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

Kind = Literal["chat", "completion"]
# llama.cpp reads seed 0xFFFFFFFF as "pick a random seed"; stay below it.
SEED_RANGE = 0xFFFFFFFF
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection first"
# OpenAI's default budget for the legacy endpoint when the client sent no max_tokens.
COMPLETION_DEFAULT_MAX_TOKENS = 16
T = TypeVar("T")
# Stream events' JSON: compact and UTF-8 unescaped, pydantic's form (see _Events). One
# encoder: json.dumps with options builds a new one per call.
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Job:
    """A validated request plus what the response needs to echo."""

    kind: Kind
    request: GenerationRequest
    stream: bool
    include_usage: bool
    created: int
    # The client's input in one canonical form, for the audit log's keyed hash (and its
    # encrypted capture, when on): chat messages as JSON, or the completion prompt.
    audit_input: bytes

    @property
    def wire_id(self) -> str:
        """The response id on the wire: the exchange's id with OpenAI's prefix."""
        prefix = "chatcmpl-" if self.kind == "chat" else "cmpl-"
        return prefix + self.request.request_id


async def chat_completions(body: ChatCompletionRequest, http: Request) -> Response:
    """``POST /v1/chat/completions``: the whole request (see the module docstring)."""
    served = _resolve(http, body)
    salt = _cache_salt(served.spec, http)
    return await _serve(chat_job(body, served, *_arrival(http), salt), served, http)


async def completions(body: CompletionRequest, http: Request) -> Response:
    """``POST /v1/completions``: the whole request (see the module docstring)."""
    served = _resolve(http, body)
    salt = _cache_salt(served.spec, http)
    return await _serve(completion_job(body, served, *_arrival(http), salt), served, http)


def _resolve(http: Request, body: ChatCompletionRequest | CompletionRequest) -> Served:
    """The served model, with what the audit record and the access log need to know."""
    ex = exchange(http)
    ex.endpoint = http.scope["route"].path
    ex.user, ex.stream = body.user, bool(body.stream)
    key = role(http, ("user", "admin"))
    require_model(key, body.model)  # before the lookup: no probing for model names
    http.app.state.security.limiter.admit(key)
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


def _messages(messages: list[ChatMessageIn]) -> tuple[Message, ...]:
    out = []
    for i, m in enumerate(messages):
        if m.content is None:
            raise InvalidRequestError(
                "Every message needs text content.", param=f"messages[{i}].content"
            )
        text = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        out.append(Message("system" if m.role == "developer" else m.role, text))
    return tuple(out)


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
    if body.logprobs or body.top_logprobs is not None:
        # Named as sent: `top_logprobs` alone is refused under its own name.
        raise _refuse(
            "logprobs" if body.logprobs else "top_logprobs", "log probabilities are not returned"
        )
    if body.tools or body.functions:
        raise _refuse("tools" if body.tools else "functions", "tool calling is not implemented")
    if body.tool_choice not in (None, "none") or body.function_call not in (None, "none"):
        raise _refuse(
            "tool_choice" if body.tool_choice not in (None, "none") else "function_call",
            "tool calling is not implemented",
        )
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise _refuse("response_format", "only plain text output is implemented")
    _bound_messages(served, len(body.messages))
    messages = _messages(body.messages)
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
    )
    audit_input = chat_input([(m.role, m.content) for m in messages])
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
    if body.logprobs is not None:
        raise _refuse("logprobs", "log probabilities are not returned")
    if body.suffix:
        raise _refuse("suffix", "fill-in-the-middle is not implemented")
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
    into one response; None if it ended without a last chunk."""
    parts: list[str] = []
    fields = DeltaFields()
    last: GenerationChunk | None = None
    ex = exchange(http)
    chunk = first
    while chunk is not None:
        extra = chunk.extra if job.kind == "chat" else None  # completions have no delta
        if chunk.text or extra:
            ex.token()
        if extra:
            fields.add(extra)
        parts.append(chunk.text)
        last = chunk
        chunk = await anext(chunks, None)
    if last is None or last.finish_reason is None:
        return None
    usage = _finished(http, last)
    text = "".join(parts)
    # The record is durable before the response exists; in fail-closed mode a failed
    # write raises the 503 that replaces it.
    await http.app.state.auditor.generation(ex, job.audit_input, audited_output(text, fields))
    r = job.request
    if job.kind == "chat":
        return ChatCompletion(
            id=job.wire_id,
            created=job.created,
            model=r.model,
            choices=[ChatChoice(message=_message(text, fields), finish_reason=last.finish_reason)],
            usage=usage,
        )
    return Completion(
        id=job.wire_id,
        created=job.created,
        model=r.model,
        choices=[CompletionChoice(text=text, finish_reason=last.finish_reason)],
        usage=usage,
    )


def audited_output(text: str, fields: DeltaFields) -> str:
    """What the audit log hashes (and captures) as the answer: its text, or, when the
    answer also carried other message fields the client received (``reasoning_content``
    and the like, :class:`DeltaFields`), the JSON object of ``content`` and those fields,
    keys sorted, so that no text sent to the client is left out of the record."""
    merged = fields.merged()
    if not merged:
        return text
    return json.dumps({"content": text, **merged}, sort_keys=True, ensure_ascii=False)


def _message(text: str, fields: DeltaFields) -> ChatMessageOut:
    """The answer's message: ``content``, then the stream's extra delta fields merged
    (built unvalidated: the fields are the engine's, passed on as they came)."""
    return ChatMessageOut.model_construct(content=text, **fields.merged())


def _finished(http: Request, chunk: GenerationChunk) -> Usage:
    """Note the last chunk's counts on the exchange; the usage block for the response."""
    ex = exchange(http)
    p, c = chunk.prompt_tokens or 0, chunk.completion_tokens or 0
    ex.prompt_tokens, ex.completion_tokens, ex.finish_reason = p, c, chunk.finish_reason
    ex.queue_s = chunk.queue_s
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


class _Events:
    """Serialises one stream's events: OpenAI's chunk JSON built as dictionaries, one
    ``json`` encoding per event. The bytes are exactly what the chunk models of
    :mod:`medserve.api.protocol` (ChatCompletionChunk, CompletionChunk) give with
    ``model_dump_json(exclude_unset=True)``: the same field order, compact separators,
    UTF-8 left unescaped, and a string without a UTF-8 form (a lone surrogate) raises
    (tests/api/test_events.py holds them to it). Building three models per event instead
    cost about 6 µs more per event (measured; see tests/bench/gateway.py).

    A chat delta holds ``content`` (when there is text), then the chunk's ``extra`` fields
    as the engine passed them.
    """

    def __init__(self, job: Job) -> None:
        self.chat = job.kind == "chat"
        self.head: dict[str, Any] = {
            "id": job.wire_id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": job.created,
            "model": job.request.model,
        }
        # exclude_unset: `usage` is on every event (null until the last) only when asked.
        self.tail: dict[str, Any] = {"usage": None} if job.include_usage else {}

    def role(self) -> str:
        delta = {"role": "assistant", "content": ""}
        return self._dump([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])

    def piece(
        self, text: str, finish: str | None = None, extra: Mapping[str, Any] | None = None
    ) -> str:
        """One event of generated ``text`` (chat: and ``extra`` delta fields), or the
        last one with its ``finish`` reason."""
        choice: dict[str, Any]
        if self.chat:
            delta: dict[str, Any] = {"content": text} if text else {}
            if extra:
                delta.update(extra)
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return self._dump([choice])

    def usage(self, usage: Usage) -> str:
        return self._dump([], {"usage": usage.model_dump()})

    def _dump(self, choices: list[dict[str, Any]], tail: dict[str, Any] | None = None) -> str:
        event = _JSON.encode(
            {**self.head, "choices": choices, **(self.tail if tail is None else tail)}
        )
        event.encode()  # raises UnicodeEncodeError, as the models' dump does, on a lone surrogate
        return event


class DeltaFields:
    """A stream's ``GenerationChunk.extra`` fields merged into one chat message's fields
    (the non-streaming answer), in the order each field first came. A string value is
    appended to the field's string so far (``reasoning_content`` pieces make the whole
    reasoning); any other value (number, boolean, list, object) replaces the field's value
    so far, so the last one wins (lists and objects are not merged: tool-call fragments,
    which medserve never asks for as it refuses ``tools``, would not be joined); null is
    skipped."""

    def __init__(self) -> None:
        self._fields: dict[str, Any] = {}  # a string field holds its pieces, as _Pieces

    def add(self, extra: Mapping[str, Any]) -> None:
        for name, value in extra.items():
            if value is None:
                continue
            held = self._fields.get(name)
            if not isinstance(value, str):
                self._fields[name] = value
            elif isinstance(held, _Pieces):
                held.append(value)
            else:
                self._fields[name] = _Pieces([value])

    def merged(self) -> dict[str, Any]:
        return {
            name: "".join(value) if isinstance(value, _Pieces) else value
            for name, value in self._fields.items()
        }


class _Pieces(list[str]):
    """The pieces of one string field (a list value of the upstream's stays a list)."""


async def stream(
    job: Job,
    first: GenerationChunk | None,
    chunks: AsyncIterator[GenerationChunk],
    http: Request,
) -> AsyncGenerator[str, None]:
    """SSE ``data:`` payloads in OpenAI's chunk format, ending with ``[DONE]``.

    ``first`` is the engine's first chunk, pulled before the response started; the rest
    come from ``chunks``. ``[DONE]`` means the answer is complete and its audit record
    committed. Once the first byte is out, a failure can no longer change the status code;
    it is sent as an ``{"error": ...}`` event that ends the stream instead, with no
    ``[DONE]`` after it (engine error, timeout, failed audit write, unexpected exception).
    """
    events = _Events(job)
    ex = exchange(http)
    parts: list[str] = []
    fields = DeltaFields()
    try:
        if events.chat:
            yield events.role()
        chunk = first
        while chunk is not None:
            parts.append(chunk.text)
            if chunk.text or (chunk.extra and events.chat):
                ex.token()
                if chunk.extra and events.chat:
                    fields.add(chunk.extra)
                yield events.piece(chunk.text, extra=chunk.extra)
            if chunk.finish_reason is not None:
                yield events.piece("", chunk.finish_reason)
                usage = _finished(http, chunk)
                if job.include_usage:
                    yield events.usage(usage)
            chunk = await anext(chunks, None)
        # Recorded before [DONE]: a client that saw the end of the stream has its record.
        output = audited_output("".join(parts), fields)
        await http.app.state.auditor.generation(ex, job.audit_input, output)
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
