"""The engine boundary: what the gateway hands an engine and what it gets back.

Engines never see the HTTP wire format. The web layer parses a request into a frozen
:class:`GenerationRequest`: the client's messages or prompt text, engine-neutral sampling
(OpenAI's names) and the request's limits. Each engine renders the chat template, tokenizes
and checks the context window itself, inside :meth:`Engine.generate` (a vLLM server renders
on its side), so the same request can be taken to another engine. An engine only streams
:class:`GenerationChunk` values back. Streaming is the only generation path; a non-streaming
response drains it; closing the iterator cancels.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

# OpenAI's finish reasons that an engine may end with: llama.cpp and the fake engine give
# "stop" or "length"; a vLLM replica passes "tool_calls" and "content_filter" through.
FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]
Role = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A complete function call: in an assistant message of the history, or (as deltas,
    :class:`ToolCallDelta`) in an answer. ``arguments`` is JSON text, as OpenAI sends it."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message (content parts are joined by the web layer).

    ``tool_calls``: an assistant message's calls (its ``content`` may then be empty);
    ``tool_call_id``: a ``tool`` message's answer to that call (its content is the result).
    """

    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call (OpenAI's ``tools[].function``). ``parameters`` is the
    JSON schema of its arguments as compact JSON text in the client's key order (property
    order is the order a constrained answer writes its keys in, as OpenAI keeps it);
    ``{"type":"object","properties":{}}`` when the client gave none."""

    name: str
    parameters: str
    description: str | None = None
    strict: bool = False


@dataclass(frozen=True, slots=True)
class NamedTool:
    """``tool_choice`` naming one function: the answer is a call of it."""

    name: str


ToolChoice = Literal["none", "auto", "required"] | NamedTool
ConstraintKind = Literal["json_object", "json_schema", "tool"]


@dataclass(frozen=True, slots=True)
class Constraint:
    """The answer must be JSON of a shape: grammar-constrained sampling on llama.cpp,
    vLLM's structured outputs on a vLLM replica.

    ``kind``: ``json_object`` (any JSON object; ``schema`` None), ``json_schema`` (the
    client's ``response_format.json_schema``), or ``tool`` (``tool_choice`` named a function
    or was ``required``: the answer is a tool call, see below).
    ``schema``: the JSON schema as compact JSON text (no spaces) in the client's key order
    (the answer writes properties in that order, as OpenAI's structured outputs do), already
    checked by :func:`medserve.engines.grammar.check_schema` (every keyword it holds can be
    enforced); ``sha256``: hex digest of ``schema``'s UTF-8 bytes (the audit log records it,
    never the schema: property names can name patient fields), "" without a schema.
    ``name``: the json_schema's name, or the named tool's name (None for ``required``).
    For ``tool``: with a name, ``schema`` is that function's parameters and the constrained
    text is its arguments; without (``required``), ``schema`` is
    ``{"anyOf": [{"type":"object","properties":{"name":{"const":NAME},"arguments":PARAMS},
    "required":["name","arguments"]}, ...]}`` over the request's tools and the text is one
    ``{"name", "arguments"}`` object. The engine turns that text into one tool call.
    """

    kind: ConstraintKind
    schema: str | None = None
    sha256: str = ""
    name: str | None = None
    strict: bool = False


@dataclass(frozen=True, slots=True)
class Prompt:
    """A prompt as the model will see it (engine-internal): the rendered text and its ids."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Sampling:
    """Sampling parameters: request values, else the model's defaults (OpenAI's names).

    ``max_tokens`` is the client's completion budget, or None: then ``default_max_tokens``
    applies, cut to what fits the context window. ``max_tokens_param`` is the field the
    client sent it in (``max_tokens`` or ``max_completion_tokens``), so that a context
    error names what the client sent.
    """

    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repeat_penalty: float
    frequency_penalty: float
    presence_penalty: float
    seed: int
    stop: tuple[str, ...] = ()
    default_max_tokens: int = 16
    max_tokens_param: str = "max_tokens"


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """A validated request: chat ``messages`` or completion ``prompt`` text (exactly one).

    ``request_id`` is the exchange's id (the wire adds ``chatcmpl-``/``cmpl-``).
    ``deadline`` is the time.monotonic() by which the request must be done (504 after): set
    from its arrival, so rendering and waiting count; None: the engine's timeout_s from
    submission. Only the serving entries (:mod:`medserve.api.serving`) and tests build these.

    ``cache_salt`` (vLLM's name for it): requests reuse each other's prompt KV (prefix
    cache) only when their salts are equal; None is the shared default. The serving layer
    sets it to the API key's id when the model isolates its prefix cache per key.
    """

    request_id: str
    model: str
    sampling: Sampling
    messages: tuple[Message, ...] | None = None
    prompt: str | None = None
    user: str | None = None
    deadline: float | None = None
    cache_salt: str | None = None
    constraint: Constraint | None = None
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice | None = None
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a GenerationRequest holds messages or a prompt, not both")

    @property
    def input_param(self) -> str:
        """The wire field the input came in: ``messages`` or ``prompt`` (for errors)."""
        return "messages" if self.messages is not None else "prompt"


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of the answer's tool call number ``index`` (OpenAI's stream shape): the
    first piece of a call has its ``id`` and ``name``, later pieces append ``arguments``
    text. The non-streaming answer joins them per index."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One sampled token's log-probability and, in ``top``, the most likely alternatives
    (as TokenLogprob with empty ``top``), most likely first. ``token`` is the token's text
    (its bytes decoded as UTF-8, a partial character replaced), ``token_bytes`` its exact
    bytes. Log-probabilities are natural logs of the model's distribution before
    penalties, temperature and truncation (vLLM's default ``raw_logprobs``)."""

    token: str
    token_bytes: bytes
    logprob: float
    top: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class GenerationChunk:
    """A piece of generated text. The last chunk carries the finish reason and counts.

    ``extra``: chat delta fields beyond the text, passed to the client as they came (an
    OpenAI-compatible upstream's ``reasoning_content``/``reasoning`` or any field medserve
    does not know), JSON values keyed by field name, never ``role`` or ``content``; None
    for none. A chunk may carry only ``extra`` (empty ``text``). Streaming, the web layer
    adds them to the event's delta; non-streaming, it merges them into the message (see
    :class:`medserve.api.answers.DeltaFields`). Completions have no delta: not sent there.

    ``tool_calls``: pieces of the answer's tool calls (the last chunk then has
    ``finish_reason`` ``tool_calls``); ``logprobs``: one entry per token whose text this
    chunk carries, in order, when the request asked for them (else empty).
    """

    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    queue_s: float | None = None  # last chunk: time the request waited for a slot
    extra: Mapping[str, Any] | None = None
    tool_calls: tuple[ToolCallDelta, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()

    def __post_init__(self) -> None:
        if self.extra is not None and ("content" in self.extra or "role" in self.extra):
            raise ValueError("GenerationChunk.extra holds fields beyond role and content")


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What an engine serves, for routing, /v1/models and readiness."""

    name: str
    kind: str
    model: str
    context_length: int
    owned_by: str = "medserve"
    # The most input bytes one token can stand for (the longest piece of the vocabulary),
    # or None when no such bound holds. A prompt of more than context_length times this
    # many bytes (or characters, never more than bytes) cannot fit: the engine refuses it
    # before rendering or tokenizing anything (medserve.engines.prepare.bound_chars).
    max_token_bytes: int | None = None
    # Requests the engine takes at once, generating plus waiting for a slot (llama.cpp:
    # parallel + max_queue), or None for no bound. The router admits no more than this
    # and answers 503 ``overloaded`` with ``Retry-After: retry_after_s`` beyond it.
    capacity: int | None = None
    retry_after_s: int = 1
    # sha256 of the weights this engine answers with, from its artifact manifest, or None
    # without one: llama.cpp the GGUF file's (verified against the file at start); an
    # engine that reads a whole artifact directory (vLLM, fake) the digest of the
    # manifest's file table (medserve.manifest.artifact_digest), as the manifest declares.
    weights_sha256: str | None = None


@dataclass(frozen=True, slots=True)
class Health:
    """Engine readiness as seen by ``/ready``."""

    ready: bool
    running: int = 0
    waiting: int = 0
    # Requests refused since start because the engine was full: counted by the router
    # (which admits), filled in by :meth:`medserve.router.Router.health`.
    rejected: int = 0
    # The engine could not be reached at all (connection refused): the router's health
    # checks eject it at once rather than after several failures.
    unreachable: bool = False
    # Why the engine is not ready, for the operator (e.g. a supervised vLLM restarting or
    # crash-looping); None when ready or when the engine has nothing to say.
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class LoadStats:
    """A replica's own view of its load (vLLM: its ``/metrics``), for choosing replicas.

    ``waiting``/``running``: requests queued in / running on the replica (all clients, not
    only this gateway's); ``kv_cache_usage``: the fraction (0 to 1) of its KV cache in use.
    None means unknown (not exported, unreadable), never 0.
    """

    waiting: int | None = None
    running: int | None = None
    kv_cache_usage: float | None = None


@runtime_checkable
class Engine(Protocol):
    """One loaded model. All methods are safe to call from the event loop."""

    @property
    def info(self) -> EngineInfo:
        """Identity and limits; valid once :meth:`start` returned."""
        ...

    async def start(self) -> None:
        """Load the model. Raises :class:`medserve.errors.EngineError` on failure."""

    async def close(self) -> None:
        """Stop generating and free the model. Idempotent."""

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        r"""Render, tokenize and check ``request``, then stream its completion.

        Text chunks, then exactly one last chunk with ``finish_reason`` and token counts.
        Errors are typed (:class:`medserve.errors.MedserveError`); one about the input
        (ContextLengthError naming ``messages``/``prompt``/the budget field, a template
        refusal, a timeout while rendering) comes before any chunk, with ``prompt_tokens``
        set once the prompt was tokenized. Closing the iterator early stops generation and
        frees the slot (the one cancellation contract).
        """
        ...

    async def health(self) -> Health:
        """Readiness and load."""
        ...


@runtime_checkable
class LoadReporter(Protocol):
    """An optional engine capability: engines that can read their server's own load
    (vLLM) have it; the router checks with ``isinstance`` and scrapes those only."""

    async def load_stats(self) -> LoadStats | None:
        """The server's load now, or None when it could not be read (never raises)."""
        ...


@dataclass(frozen=True, slots=True)
class PrefixCacheStats:
    """An engine's prefix cache (KV of prompt heads kept for reuse), since start.

    ``hits``/``misses``: requests that reused at least one prompt token / none;
    ``prompt_tokens``: prompt tokens of those requests (the lookups), ``reused_tokens``: the
    ones whose KV was reused instead of computed (reused/prompt is the token hit rate);
    ``bytes``/``capacity_bytes``: host memory held by saved prefixes / its bound;
    ``entries``: saved prefixes in host memory; ``evictions``: saved prefixes dropped to
    stay under the bound (least recently used first).
    """

    hits: int = 0
    misses: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0
    bytes: int = 0
    capacity_bytes: int = 0
    entries: int = 0
    evictions: int = 0


@runtime_checkable
class PrefixCacheReporter(Protocol):
    """An optional engine capability: engines with a prefix cache of their own in this
    process (llama.cpp) report it; ``/metrics`` and ``/ready`` check with ``isinstance``."""

    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        """The cache's counters now, read from memory; None when the cache is off."""
        ...


@runtime_checkable
class LocalHealth(Protocol):
    """An optional engine capability: engines whose health lives in their own memory
    (llama.cpp and fake, in this process) read it without I/O. ``/ready`` and ``/metrics``
    report such an engine's health live (:meth:`medserve.router.Router.health`); an engine
    without it (vLLM, behind HTTP) is reported from the router's last active check, so that
    neither ever waits on an upstream."""

    def health_now(self) -> Health:
        """Readiness and load now, read from memory (never blocks, never raises)."""
        ...
