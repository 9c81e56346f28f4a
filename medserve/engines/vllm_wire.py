"""Translation between medserve's engine types and a vLLM server's OpenAI wire format.

Pure functions, no I/O: :mod:`medserve.engines.vllm` sends what :func:`request_body` and
:func:`tokenize_body` build, and turns what comes back into chunks and typed errors with
:func:`last_chunk`, :func:`refusal_error` and :func:`context_error`. Reading the bytes
(SSE events, error bodies, ``/metrics``) is :mod:`medserve.engines.upstream`'s.

Nothing here puts upstream text into an error: an upstream ``message`` is only matched
against known phrases, and a ``param`` is shown only when
:data:`medserve.engines.upstream.PARAMS` knows it.
"""

from __future__ import annotations

import re
from typing import Any

from medserve.engines.base import FinishReason, GenerationChunk, GenerationRequest
from medserve.errors import (
    ContextLengthError,
    EngineError,
    InvalidRequestError,
    MedserveError,
    OverloadedError,
)

CLIENT_FAULT = frozenset({400, 413, 422})
BUSY = frozenset({429, 503})
# vLLM's phrases for the prompt's token count in a context-length error (versions differ).
TOKENS = re.compile(r"(\d+) (?:input tokens|tokens in the messages|in the messages|in the prompt)")
CHAT_PATH, COMPLETIONS_PATH = "/v1/chat/completions", "/v1/completions"


def request_body(request: GenerationRequest, served: str) -> tuple[str, dict[str, Any]]:
    """The upstream path and JSON body for ``request``, sent as model ``served``.

    Always streaming with ``stream_options.include_usage``; sampling under vLLM's names
    (``repeat_penalty`` as ``repetition_penalty``; OpenAI's ``top_p`` 0, greedy, as
    ``temperature`` 0 with ``top_p`` 1, since vLLM wants top_p in (0, 1]); ``top_k``,
    ``stop`` and ``max_tokens`` only when set; ``cache_salt`` only when set. The client's
    ``user`` is never sent.
    """
    s = request.sampling
    body: dict[str, Any] = {"model": served}
    if request.messages is not None:
        path = CHAT_PATH
        body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
    else:
        path = COMPLETIONS_PATH
        body["prompt"] = request.prompt or ""
    body |= {
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.0 if s.top_p == 0 else s.temperature,
        "top_p": s.top_p or 1.0,
        "frequency_penalty": s.frequency_penalty,
        "presence_penalty": s.presence_penalty,
        "seed": s.seed,
        "min_p": s.min_p,
        "repetition_penalty": s.repeat_penalty,
    }
    if s.top_k > 0:
        body["top_k"] = s.top_k
    if s.stop:
        body["stop"] = list(s.stop)
    if s.max_tokens is not None:  # None: the upstream's default, within the context
        body["max_tokens"] = s.max_tokens
    if request.cache_salt is not None:
        # vLLM's own field (since 0.9): its prefix cache reuses a block only for
        # requests with the same salt. Absent: the server's shared cache.
        body["cache_salt"] = request.cache_salt
    return path, body


def tokenize_body(body: dict[str, Any]) -> dict[str, Any]:
    """The ``POST /tokenize`` body that counts the prompt of the generation ``body``: its
    messages with the generation prompt (the chat template applied), or its prompt."""
    ask: dict[str, Any] = {"model": body["model"]}
    if "messages" in body:
        ask |= {"messages": body["messages"], "add_generation_prompt": True}
    else:
        ask["prompt"] = body["prompt"]
    return ask


def last_chunk(finish: FinishReason, usage: dict[str, Any] | None, deltas: int) -> GenerationChunk:
    """The stream's last chunk: ``finish`` and the upstream's exact usage counts; without
    a usage object (an upstream that ignores include_usage), prompt 0 and the number of
    deltas relayed as the completion count."""
    if usage is None:
        return GenerationChunk("", finish_reason=finish, prompt_tokens=0, completion_tokens=deltas)
    return GenerationChunk(
        "",
        finish_reason=finish,
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
    )


def refusal_error(
    request: GenerationRequest,
    status: int,
    message: str,
    param: str | None,
    retry_after: str,
    default_retry_s: int,
    context: int,
) -> MedserveError:
    """The typed error for an upstream's non-200 answer.

    ``message``/``param``: the error body's (:func:`medserve.engines.upstream.
    error_message`; used for classification only), ``retry_after`` its Retry-After header
    ("" when absent), ``context`` the replica's context window in tokens. 429/503 →
    OverloadedError (Retry-After, else ``default_retry_s``); 400/413/422 about the context
    window → :func:`context_error`, other ones → InvalidRequestError naming ``param``;
    anything else → EngineError (not the client's fault).
    """
    if status in BUSY:
        return OverloadedError(
            "The model's engine is busy; retry shortly.",
            retry_after=int(retry_after) if retry_after.isdigit() else default_retry_s,
        )
    if status not in CLIENT_FAULT:
        return EngineError("The model's engine failed to answer.", code="engine_error")
    # "maximum context length" (the prompt; older vLLM also the budget), or vLLM
    # 0.32's "max_tokens=N cannot be greater than max_model_len=M" (the budget alone).
    if any(words in message.lower() for words in ("maximum context length", "max_model_len")):
        return context_error(request, message, context)
    return InvalidRequestError(
        "The model's engine refused the request as invalid"
        + (f": check `{param}`." if param else "."),
        param=param,
    )


def context_error(request: GenerationRequest, message: str, context: int) -> ContextLengthError:
    """A context-length refusal as medserve words it: naming the budget field when the
    upstream's ``message`` blames the budget (and the prompt alone fits), else the input;
    ``prompt_tokens`` from the message when it gives the count (else 0)."""
    found = TOKENS.search(message)
    prompt_tokens = int(found.group(1)) if found else None
    budget = "max_tokens" in message or "max_completion_tokens" in message
    if prompt_tokens is not None and prompt_tokens >= context:
        budget = False
    if budget and request.sampling.max_tokens is not None:
        s = request.sampling
        prompt = "" if prompt_tokens is None else f"The prompt ({prompt_tokens} tokens) plus "
        exc = ContextLengthError(
            f"{prompt}{s.max_tokens_param} ({s.max_tokens}) exceeds this model's context "
            f"window of {context} tokens.",
            param=s.max_tokens_param,
        )
    else:
        exc = ContextLengthError(
            f"The prompt does not fit this model's context window of {context} tokens.",
            param=request.input_param,
        )
    exc.prompt_tokens = prompt_tokens if prompt_tokens is not None else 0
    return exc
