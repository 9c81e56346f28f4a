"""From an OpenAI request to a GenerationRequest, and from engine chunks to OpenAI responses.

This is where requests are parsed into the engine's frozen type ("parse, don't validate"):
unsupported parameters are refused by name, sampling is resolved against the model's
defaults, and the prompt plus completion budget is checked against the context window.
Both response shapes come from the same chunk stream: a non-streaming response drains it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Literal

import anyio
from starlette.requests import Request

from medserve.api.exchange import exchange
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
from medserve.audit.record import chat_input
from medserve.config import ModelSpec
from medserve.engines.base import (
    GenerationChunk,
    GenerationRequest,
    Message,
    Prompt,
    Sampling,
)
from medserve.errors import (
    ContextLengthError,
    InvalidRequestError,
    MedserveError,
    RequestTimeoutError,
    UnsupportedParameterError,
    envelope,
)
from medserve.router import Served

log = logging.getLogger(__name__)

Kind = Literal["chat", "completion"]
# llama.cpp reads seed 0xFFFFFFFF as "pick a random seed"; stay below it.
SEED_RANGE = 0xFFFFFFFF


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


def _budget(
    requested: tuple[str, int] | None,
    default: int,
    prompt: Prompt,
    context: int,
    prompt_param: str,
) -> int:
    """The completion budget: checked against the context window, never silently cut.

    ``requested`` is the client's budget as (the field it was sent in, its value), so the
    error names the field the client actually sent (``max_completion_tokens`` or its
    deprecated alias ``max_tokens``); None when the client sent neither, and the default,
    cut to what fits, applies.
    """
    n = len(prompt.token_ids)
    if n >= context:
        raise ContextLengthError(
            f"The prompt is {n} tokens; this model's context window is {context} tokens.",
            param=prompt_param,
        )
    if requested is None:
        return min(default, context - n)
    param, value = requested
    if n + value > context:
        raise ContextLengthError(
            f"The prompt ({n} tokens) plus {param} ({value}) exceeds this model's "
            f"context window of {context} tokens.",
            param=param,
        )
    return value


def _sent(body: ChatCompletionRequest | CompletionRequest, *names: str) -> tuple[str, int] | None:
    """The first of ``names`` the client sent (not null), with its value."""
    for name in names:
        value = getattr(body, name)
        if name in body.model_fields_set and value is not None:
            return name, int(value)
    return None


def _sampling(
    body: ChatCompletionRequest | CompletionRequest, spec: ModelSpec, max_tokens: int
) -> Sampling:
    d = spec.defaults
    return Sampling(
        max_tokens=max_tokens,
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
    """Refuse, before rendering, more messages than can fit: at most ``max_messages``
    (ModelSpec) and at most ``context_length``, since every message renders to at least
    one token. Raises ContextLengthError (400 ``context_length_exceeded``, ``messages``)."""
    context = served.engine.info.context_length
    cap = min(served.spec.max_messages, context)
    if count > cap:
        raise ContextLengthError(
            f"The request has {count} messages; this model takes at most {cap} "
            f"(its context window is {context} tokens).",
            param="messages",
        )


def _bound_chars(served: Served, chars: int, param: str) -> None:
    """Refuse, before rendering or tokenizing, client text that cannot fit the context.

    Each token stands for at most ``max_token_bytes`` bytes of input (the longest piece of
    the vocabulary, read at load), and a character is at least one byte, so more than
    ``context_length * max_token_bytes`` characters are more than ``context_length``
    tokens. Engines that know no such bound give None (no check). Raises
    ContextLengthError (400 ``context_length_exceeded``) naming ``param``.
    """
    info = served.engine.info
    if info.max_token_bytes and chars > info.context_length * info.max_token_bytes:
        raise ContextLengthError(
            f"The {param} text ({chars} characters) cannot fit this model's context window "
            f"of {info.context_length} tokens (at most "
            f"{info.context_length * info.max_token_bytes} characters).",
            param=param,
        )


Charge = Callable[[int], None]


async def _rendered(render: Awaitable[Prompt], deadline: float, charge: Charge | None) -> Prompt:
    """Await a rendering; over the request's deadline, 504 (its tokens are charged)."""
    prompt = await render
    if time.monotonic() > deadline:
        if charge is not None:
            charge(len(prompt.token_ids))
        raise RequestTimeoutError()
    return prompt


def _charged(charge: Charge | None, prompt: Prompt, budget: Callable[[], int]) -> int:
    """``budget()``; a prompt refused as too long is still charged to the key's tokens."""
    try:
        return budget()
    except ContextLengthError:
        if charge is not None:
            charge(len(prompt.token_ids))
        raise


async def chat_job(
    body: ChatCompletionRequest,
    served: Served,
    request_id: str,
    arrived: float | None = None,
    charge: Charge | None = None,
) -> Job:
    """Parse a chat request into a Job, or raise the 400 that names the bad parameter.

    ``arrived`` (time.monotonic() at the request's arrival) starts the model's
    ``timeout_s``, so rendering counts; ``charge`` is called with the prompt's token count
    when a rendered prompt is refused (too long, out of time).
    """
    deadline = (time.monotonic() if arrived is None else arrived) + served.spec.timeout_s
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
    # Both bounds before the template is rendered: what cannot fit costs nothing more.
    _bound_messages(served, len(body.messages))
    messages = _messages(body.messages)
    _bound_chars(served, sum(len(m.content) for m in messages), "messages")
    prompt = await _rendered(served.engine.render_chat(messages), deadline, charge)
    requested = _sent(body, "max_completion_tokens", "max_tokens")
    max_tokens = _charged(
        charge,
        prompt,
        lambda: _budget(
            requested,
            served.spec.defaults.max_tokens,
            prompt,
            served.engine.info.context_length,
            "messages",
        ),
    )
    audit_input = chat_input([(m.role, m.content) for m in messages])
    job = _job("chat", body, served, prompt, max_tokens, f"chatcmpl-{request_id}", audit_input)
    return _with_deadline(job, deadline)


async def completion_job(
    body: CompletionRequest,
    served: Served,
    request_id: str,
    arrived: float | None = None,
    charge: Charge | None = None,
) -> Job:
    """Parse a legacy completion request into a Job (``arrived``, ``charge``: as for chat)."""
    deadline = (time.monotonic() if arrived is None else arrived) + served.spec.timeout_s
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
    _bound_chars(served, len(text), "prompt")
    prompt = await _rendered(served.engine.render_text(text), deadline, charge)
    # OpenAI's default of 16 when the client sent no max_tokens: cut to fit, as in chat.
    requested = _sent(body, "max_tokens")
    context = served.engine.info.context_length
    max_tokens = _charged(charge, prompt, lambda: _budget(requested, 16, prompt, context, "prompt"))
    request_key = f"cmpl-{request_id}"
    job = _job("completion", body, served, prompt, max_tokens, request_key, text.encode())
    return _with_deadline(job, deadline)


def _with_deadline(job: Job, deadline: float) -> Job:
    return dataclasses.replace(job, request=dataclasses.replace(job.request, deadline=deadline))


def _job(
    kind: Kind,
    body: ChatCompletionRequest | CompletionRequest,
    served: Served,
    prompt: Prompt,
    max_tokens: int,
    request_id: str,
    audit_input: bytes,
) -> Job:
    request = GenerationRequest(
        request_id=request_id,
        model=served.spec.id,
        prompt=prompt,
        sampling=_sampling(body, served.spec, max_tokens),
        user=body.user,
    )
    return Job(
        kind=kind,
        request=request,
        stream=bool(body.stream),
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        created=int(time.time()),
        audit_input=audit_input,
    )


async def complete(job: Job, served: Served, http: Request) -> ChatCompletion | Completion | None:
    """Drain the engine's stream into one response.

    Returns None if the client disconnected first; generation is stopped then, so a
    client that gives up does not keep the model busy.
    """
    parts: list[str] = []
    last: GenerationChunk | None = None
    with anyio.CancelScope() as scope:
        watcher = asyncio.create_task(_cancel_on_disconnect(http, scope))
        try:
            ex = exchange(http)
            async with aclosing(served.engine.generate(job.request)) as chunks:
                async for chunk in chunks:
                    if chunk.text:
                        ex.token()
                    parts.append(chunk.text)
                    last = chunk
        finally:
            watcher.cancel()
    if last is None or last.finish_reason is None:
        return None
    usage = _finished(http, last)
    text = "".join(parts)
    # The record is durable before the response exists; in fail-closed mode a failed
    # write raises the 503 that replaces it.
    await http.app.state.auditor.generation(exchange(http), job.audit_input, text)
    r = job.request
    if job.kind == "chat":
        return ChatCompletion(
            id=r.request_id,
            created=job.created,
            model=r.model,
            choices=[
                ChatChoice(message=ChatMessageOut(content=text), finish_reason=last.finish_reason)
            ],
            usage=usage,
        )
    return Completion(
        id=r.request_id,
        created=job.created,
        model=r.model,
        choices=[CompletionChoice(text=text, finish_reason=last.finish_reason)],
        usage=usage,
    )


async def _cancel_on_disconnect(http: Request, scope: anyio.CancelScope) -> None:
    # The body has been read, so the next ASGI message is the disconnect.
    while (await http.receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


def _finished(http: Request, chunk: GenerationChunk) -> Usage:
    """Note the last chunk's counts on the exchange; the usage block for the response."""
    ex = exchange(http)
    p, c = chunk.prompt_tokens or 0, chunk.completion_tokens or 0
    ex.prompt_tokens, ex.completion_tokens, ex.finish_reason = p, c, chunk.finish_reason
    ex.queue_s = chunk.queue_s
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


async def stream(job: Job, served: Served, http: Request) -> AsyncIterator[str]:
    """SSE ``data:`` payloads in OpenAI's chunk format, ending with ``[DONE]``.

    ``[DONE]`` means the answer is complete and its audit record committed. Once the first
    byte is out, a failure can no longer change the status code; it is sent as an
    ``{"error": ...}`` event that ends the stream instead, with no ``[DONE]`` after it
    (engine error, timeout, failed audit write, unexpected exception alike).
    """
    r = job.request
    obj = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
    usage_field: dict[str, Any] = {"usage": None} if job.include_usage else {}

    def event(choice: dict[str, Any] | None, **extra: Any) -> str:
        body: dict[str, Any] = {"id": r.request_id, "object": obj, "created": job.created}
        body["model"] = r.model
        body["choices"] = [] if choice is None else [{"index": 0, **choice}]
        body.update(usage_field)
        body.update(extra)
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"))

    def piece(text: str, finish: str | None = None) -> dict[str, Any]:
        if job.kind == "chat":
            delta = {"content": text} if text else {}
            return {"delta": delta, "logprobs": None, "finish_reason": finish}
        return {"text": text, "logprobs": None, "finish_reason": finish}

    parts: list[str] = []
    try:
        if job.kind == "chat":
            yield event(
                {
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            )
        async with aclosing(served.engine.generate(r)) as chunks:
            async for chunk in chunks:
                parts.append(chunk.text)
                if chunk.text:
                    exchange(http).token()
                if chunk.finish_reason is None:
                    if chunk.text:
                        yield event(piece(chunk.text))
                    continue
                if chunk.text:
                    yield event(piece(chunk.text))
                yield event(piece("", chunk.finish_reason))
                usage = _finished(http, chunk)
                if job.include_usage:
                    yield event(None, usage=usage.model_dump())
        # Recorded before [DONE]: a client that saw the end of the stream has its record.
        await http.app.state.auditor.generation(exchange(http), job.audit_input, "".join(parts))
    except MedserveError as exc:
        exchange(http).failed(exc)
        yield json.dumps(envelope(exc))
        return
    except Exception:
        # Headers are out, so no handler can turn this into a 500: say it in the stream.
        log.exception("stream failed", extra={"request_id": r.request_id})
        exchange(http).error = MedserveError.type
        yield json.dumps(envelope(MedserveError("Internal server error.")))
        return
    yield "[DONE]"
