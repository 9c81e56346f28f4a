"""What medserve reads from an OpenAI-compatible upstream (a vLLM server): its stream's
events and delta fields, its error bodies, and its load from ``/metrics``.

Parsing only, no I/O policy: :mod:`medserve.engines.vllm` decides what each answer means
for a request. Nothing here logs or returns upstream text except what the caller asked
for (an error's ``message`` for classification, never shown; a ``param`` only when it is
one of :data:`PARAMS`).
"""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from medserve.engines.base import FinishReason, LoadStats

ERROR_BODY_BYTES = 64 * 1024  # most of an upstream error body read (to classify it)
METRICS_BYTES = 4 * 1024 * 1024  # most of a /metrics body read (vLLM's: about 100 kB)
WAITING, RUNNING = "vllm:num_requests_waiting", "vllm:num_requests_running"
# KV-cache usage (a fraction, 0 to 1, despite the name): the current name first, then the
# name vLLM used before 0.10, still exported by older servers.
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
LOAD_METRICS = (WAITING, RUNNING, *KV_USAGE)
# Upstream finish reasons passed on as they are (OpenAI's), and those that mean vLLM gave
# up on the request (an abort, an engine error): the stream fails instead.
FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "content_filter": "content_filter",
}
FAILED_REASONS = frozenset({"abort", "error"})
# Delta fields medserve writes itself: tool_calls become GenerationChunk.tool_calls.
OWN_DELTA = frozenset({"role", "content", "tool_calls"})


def parse_load(text: str) -> LoadStats:
    """Waiting and running requests and KV-cache usage from a vLLM ``/metrics`` body.

    Samples of one metric are added up over their labels (a data-parallel server exports
    one per engine); KV-cache usage is their mean, under the current name or else the old
    one (:data:`KV_USAGE`). A metric that is absent, not a finite number, or a body the
    Prometheus text parser refuses reads as None (unknown), never 0. Only the lines of
    :data:`LOAD_METRICS` are parsed: a vLLM body is mostly histograms.
    """
    wanted = [line for line in text.splitlines() if line.startswith(LOAD_METRICS)]
    values: dict[str, list[float]] = {}
    try:
        for family in text_string_to_metric_families("\n".join(wanted) + "\n"):
            for sample in family.samples:
                if sample.name in LOAD_METRICS and math.isfinite(sample.value):
                    values.setdefault(sample.name, []).append(float(sample.value))
    except ValueError:  # the parser's one error type for a malformed line
        return LoadStats()
    kv = next((values[name] for name in KV_USAGE if name in values), None)
    waiting, running = values.get(WAITING), values.get(RUNNING)
    return LoadStats(
        waiting=None if waiting is None else round(sum(waiting)),
        running=None if running is None else round(sum(running)),
        kv_cache_usage=None if kv is None else sum(kv) / len(kv),
    )


def parse_event(data: str) -> dict[str, Any] | None:
    try:
        value = json.loads(data)
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    if value.get("object") == "error":  # vLLM's older error shape, top level
        return {"error": value}
    return value


def delta_fields(choice: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """One upstream choice's text (chat ``delta.content``, completions ``text``) and its
    delta's other fields (but ``tool_calls``, see :func:`medserve.engines.vllm_wire.
    tool_call_deltas`) with a non-null value, in upstream order (None for none: the
    common content-only delta costs no dictionary). Null fields are dropped: a delta field
    that is null adds nothing, and a chunk of nothing but nulls must not commit a request."""
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        text = choice.get("text")
        return (text if isinstance(text, str) else ""), None
    text = delta.get("content")
    extra = None
    if len(delta) > sum(name in delta for name in OWN_DELTA):
        extra = {k: v for k, v in delta.items() if v is not None and k not in OWN_DELTA} or None
    return (text if isinstance(text, str) else ""), extra


# vLLM's name of a request field (an error's ``param``) -> the client's name of it. Only
# these are passed on: a ``param`` is upstream text, shown to the client only when known.
PARAMS = {
    name: name
    for name in (
        "messages",
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "stop",
        "frequency_penalty",
        "presence_penalty",
        "response_format",
        "tools",
        "tool_choice",
        "logprobs",
        "top_logprobs",
    )
} | {"repetition_penalty": "repeat_penalty"}


async def error_message(response: httpx.Response) -> tuple[str, str | None]:
    """The ``message`` of an upstream error body (read up to ERROR_BODY_BYTES), for
    classification only, never shown to the client or logged; and its ``param`` as the
    client calls it (:data:`PARAMS`), or None."""
    raw = bytearray()
    async for piece in response.aiter_raw():
        raw += piece
        if len(raw) >= ERROR_BODY_BYTES:
            break
    value = parse_event(raw.decode("utf-8", "replace"))
    error = value.get("error") if value else None
    message = error.get("message") if isinstance(error, dict) else None
    param = error.get("param") if isinstance(error, dict) else None
    return (message if isinstance(message, str) else ""), PARAMS.get(str(param))


# NFKC, the widest normalisation a tokenizer applies, turns one character into at most
# 11 times its UTF-8 bytes (Unicode UAX #15, "Stability of Normalized Forms"); ASCII is
# left as it is.
NORMALISED_BYTES_PER_BYTE = 11


def text_token_bound(text: str) -> int:
    """At most how many tokens any tokenizer makes of ``text``, template aside: its UTF-8
    bytes, non-ASCII ones times NORMALISED_BYTES_PER_BYTE, plus one. A token covers at
    least one byte of the (normalised) text, byte-level BPE and SentencePiece's byte
    fallback included; the one is SentencePiece's leading space marker."""
    if text.isascii():
        return len(text) + 1
    size = len(text.encode("utf-8", "surrogatepass"))
    ascii_bytes = len(text.encode("ascii", "ignore"))
    return ascii_bytes + (size - ascii_bytes) * NORMALISED_BYTES_PER_BYTE + 1


def prompt_token_bound(body: dict[str, Any], slack: int) -> int:
    """At most how many tokens the prompt of an upstream request ``body`` renders to: the
    text of its messages (role, content, an assistant's tool calls, a tool result's call
    id: :func:`text_token_bound`) and its tools, or its prompt, plus ``slack`` tokens for
    what the chat template adds (special tokens, a default system prompt). Tools and tool
    calls count as JSON indented by 4 (templates render them with ``tojson``, some
    indented: Llama 3.1's by 4)."""
    messages = body.get("messages")
    if messages is None:
        return text_token_bound(str(body.get("prompt") or "")) + slack
    total = slack
    for m in messages:
        total += text_token_bound(m["role"]) + text_token_bound(m.get("content") or "")
        for call in m.get("tool_calls") or ():
            # The arguments as the string they are, or parsed and re-rendered: either.
            total += text_token_bound(_rendered(call)) + text_token_bound(
                _rendered(_parsed(call["function"]["arguments"]))
            )
        if m.get("tool_call_id"):
            total += text_token_bound(m["tool_call_id"])
    if body.get("tools"):
        total += text_token_bound(_rendered(body["tools"]))
    return total


def _rendered(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, indent=4)


def _parsed(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return None
