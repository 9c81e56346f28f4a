"""Checks every engine makes on a request, around rendering it (shared, engine-neutral).

An engine calls them in this order inside ``generate``: :func:`bound_chars` before it
renders or tokenizes anything, then, with the prompt's token count, :func:`in_time` and
:func:`budget`. A refusal after tokenizing carries ``prompt_tokens`` so that the web layer
charges the work to the key's token rate limit. Errors name the request's fields
(``messages``/``prompt``, ``max_tokens``/``max_completion_tokens``), never the text.
"""

from __future__ import annotations

import time

from medserve.engines.base import EngineInfo, GenerationRequest
from medserve.errors import ContextLengthError, RequestTimeoutError


def input_chars(request: GenerationRequest) -> int:
    """Characters of client text in the request (all message contents, or the prompt)."""
    if request.messages is not None:
        return sum(len(m.content) for m in request.messages)
    return len(request.prompt or "")


def bound_chars(info: EngineInfo, request: GenerationRequest) -> None:
    """Refuse, before rendering or tokenizing, client text that cannot fit the context.

    Each token stands for at most ``info.max_token_bytes`` bytes of input (the longest
    piece of the vocabulary, read at load), and a character is at least one byte, so more
    than ``context_length * max_token_bytes`` characters are more than ``context_length``
    tokens. Engines that know no such bound give None (no check). Raises
    ContextLengthError (400 ``context_length_exceeded``) naming ``messages``/``prompt``.
    """
    chars = input_chars(request)
    if info.max_token_bytes and chars > info.context_length * info.max_token_bytes:
        param = request.input_param
        raise ContextLengthError(
            f"The {param} text ({chars} characters) cannot fit this model's context window "
            f"of {info.context_length} tokens (at most "
            f"{info.context_length * info.max_token_bytes} characters).",
            param=param,
        )


def in_time(request: GenerationRequest, prompt_tokens: int) -> None:
    """After rendering: past the request's deadline, 504 (its ``prompt_tokens`` charged)."""
    if request.deadline is not None and time.monotonic() > request.deadline:
        exc = RequestTimeoutError()
        exc.prompt_tokens = prompt_tokens
        raise exc


def budget(request: GenerationRequest, prompt_tokens: int, context: int) -> int:
    """The completion budget in tokens: checked against the context window, never cut.

    The client's ``max_tokens`` must fit beside the prompt (else ContextLengthError naming
    the field it was sent in); without one, ``default_max_tokens`` cut to what fits. A
    prompt that leaves no room is refused naming ``messages``/``prompt``. Every refusal
    carries ``prompt_tokens``.
    """
    n = prompt_tokens
    s = request.sampling
    if n >= context:
        exc = ContextLengthError(
            f"The prompt is {n} tokens; this model's context window is {context} tokens.",
            param=request.input_param,
        )
    elif s.max_tokens is None:
        return min(s.default_max_tokens, context - n)
    elif n + s.max_tokens > context:
        exc = ContextLengthError(
            f"The prompt ({n} tokens) plus {s.max_tokens_param} ({s.max_tokens}) exceeds "
            f"this model's context window of {context} tokens.",
            param=s.max_tokens_param,
        )
    else:
        return s.max_tokens
    exc.prompt_tokens = n
    raise exc
