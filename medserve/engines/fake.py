"""A deterministic, scriptable engine for tests and demos.

By default it echoes the prompt back word by word. It goes through the same request path
as a real engine (rendering, token counts, the context check, stop sequences, max_tokens,
cancellation), so the gateway can be tested without a model. Each word is one "token";
generation ends with ``stop`` once the whole prompt has been echoed.

Tests can script it: :meth:`FakeEngine.script` queues, per request, the text chunks and
exceptions to produce instead of the echo; :attr:`FakeEngine.history` keeps every request
that reached generation, with its rendering and budget.

Structured answers, for the wire's tests: an unscripted request with a ``tool``
constraint is answered with one call of the named function (``required``: the first
tool) whose arguments are :attr:`FakeEngine.tool_arguments`; one with a json constraint
with :attr:`FakeEngine.json_reply`; both in pieces of :data:`PIECE_CHARS` characters, one
"token" each, cut with ``length`` at the budget. Nothing checks them against the schema:
the fake honours the constraint's kind, not its schema. With ``logprobs`` asked, every
piece of text or arguments carries one :class:`TokenLogprob`: the piece itself, natural
log-probability ``-(i % 4) / 4`` for the i-th token (0 first), and ``logprobs``
alternatives, the j-th (from 0) the token itself for j = 0, else ``alt{j}`` at ``lp - j``.

With ``prefix_cache_entries`` set it keeps a prefix cache in the same terms as a real one
(:class:`FakePrefixCache`): it counts, for the gateway's metrics and ``/ready``, the
leading tokens each prompt shares with a recent prompt of the same ``cache_salt``. Nothing
is computed faster: only the counts are real.

:class:`FakeSpec` is its registry entry (``engine = "fake"``), one member of the replica
union in :class:`medserve.config.ModelSpec`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from medserve.engines.base import (
    EngineInfo,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    Health,
    Message,
    PrefixCacheStats,
    Prompt,
    TokenLogprob,
    ToolCallDelta,
)
from medserve.engines.prepare import bound_chars, budget, in_time
from medserve.engines.stops import StopMatcher
from medserve.errors import ConfigError, EngineError, UnavailableError
from medserve.manifest import ManifestError, declared_digest

if TYPE_CHECKING:
    from medserve.config import ModelSpec

DEFAULT_CONTEXT = 2048
# What the fake's prefix cache counts per token held: the token id (a 4-byte integer).
TOKEN_BYTES = 4

# Characters per "token" of a structured answer (JSON reply, tool-call arguments).
PIECE_CHARS = 4

# One scripted response: text chunks (str) in order, an exception raised at its place, or
# a GenerationChunk yielded as is (one with a finish_reason ends the response).
Step = str | BaseException | GenerationChunk


@dataclass(frozen=True, slots=True)
class FakeSettings:
    """What the fake engine reads from its registry entry (read in :func:`settings`)."""

    model: str
    context_length: int
    owned_by: str
    parallel: int | None  # generating at once; None: no bound
    max_queue: int  # waiting for a slot beyond ``parallel``
    token_delay_s: float  # pause per generated token (simulated work)
    prefix_cache_entries: int  # prompts kept for the prefix cache; 0: none


def settings(model: ModelSpec, spec: FakeSpec) -> FakeSettings:
    """The one place the fake engine reads its registry entry (model and replica)."""
    return FakeSettings(
        model=model.id,
        context_length=spec.context_length or DEFAULT_CONTEXT,
        owned_by=model.owned_by,
        parallel=spec.parallel,
        max_queue=spec.max_queue,
        token_delay_s=spec.token_delay_s,
        prefix_cache_entries=spec.prefix_cache_entries,
    )


@dataclass(frozen=True, slots=True)
class Generation:
    """One request that reached generation: as asked, as rendered, and its token budget."""

    request: GenerationRequest
    prompt: Prompt
    max_tokens: int


class FakeSpec(BaseModel):
    """One fake replica: the echo engine's limits and pace."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: Literal["fake"] = Field(description="Engine kind: the union's discriminator.")
    context_length: int | None = Field(
        None, ge=16, description=f"Context window in words; default {DEFAULT_CONTEXT}."
    )
    parallel: int | None = Field(
        None, ge=1, le=64, description="Requests generating at once; default: unbounded."
    )
    max_queue: int = Field(
        32,
        ge=0,
        description="Requests that may wait when `parallel` is set; more get 503 + Retry-After.",
    )
    token_delay_s: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        validation_alias=AliasChoices("token_delay_s", "fake_token_delay_s"),
        description="Pause per generated token (`fake_token_delay_s` in the flat form).",
    )
    manifest: Path | None = Field(
        None,
        description="An artifact manifest this replica stands in for (tests of weights "
        "identity and fallback): read at start, as a vLLM replica's.",
    )
    prefix_cache_entries: int = Field(
        0,
        ge=0,
        le=1024,
        description="Prompts the fake keeps to count prefix reuse (the most recently used; "
        ":class:`FakePrefixCache`); 0: no prefix cache, none reported.",
    )


class FakePrefixCache:
    """The fake engine's prefix cache: the token ids of the last ``entries`` prompts, each
    under its ``cache_salt``, least recently used dropped first.

    :meth:`lookup` counts one request as a real cache would: its reused tokens are the
    longest common head with a kept prompt of the same salt, less the prompt's last token
    (always computed: its logits start the answer); a hit when that is more than none.
    ``bytes`` is :data:`TOKEN_BYTES` per kept token, ``capacity_bytes`` that of ``entries``
    full context windows.
    """

    def __init__(self, entries: int, context_length: int) -> None:
        self._entries = entries
        self._kept: OrderedDict[tuple[str | None, tuple[int, ...]], None] = OrderedDict()
        self._stats = PrefixCacheStats(capacity_bytes=TOKEN_BYTES * entries * context_length)

    def lookup(self, salt: str | None, tokens: tuple[int, ...]) -> int:
        """Count one prompt's lookup and keep the prompt; returns the tokens reused."""
        common = (_common_head(tokens, kept) for s, kept in self._kept if s == salt)
        reused = min(max(common, default=0), max(len(tokens) - 1, 0))
        self._kept[(salt, tokens)] = None
        self._kept.move_to_end((salt, tokens))
        evicted = 0
        while len(self._kept) > self._entries:
            self._kept.popitem(last=False)
            evicted += 1
        s = self._stats
        self._stats = dataclasses.replace(
            s,
            hits=s.hits + int(reused > 0),
            misses=s.misses + int(reused == 0),
            prompt_tokens=s.prompt_tokens + len(tokens),
            reused_tokens=s.reused_tokens + reused,
            bytes=TOKEN_BYTES * sum(len(kept) for _, kept in self._kept),
            entries=len(self._kept),
            evictions=s.evictions + evicted,
        )
        return reused

    def stats(self) -> PrefixCacheStats:
        return self._stats


def _logprobs(request: GenerationRequest, token: str, i: int) -> tuple[TokenLogprob, ...]:
    """The i-th token's scripted log-probability when the request asked for them."""
    if request.logprobs is None:
        return ()
    lp = -(i % 4) / 4
    top = tuple(
        TokenLogprob(token, token.encode(), lp)
        if j == 0
        else TokenLogprob(f"alt{j}", b"alt%d" % j, lp - j)
        for j in range(request.logprobs)
    )
    return (TokenLogprob(token, token.encode(), lp, top),)


def _common_head(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class FakeEngine:
    """Echo engine. ``fail_after`` makes it raise an EngineError after that many tokens.

    Capacity: ``parallel`` generate at once and ``max_queue`` more wait (``EngineInfo.
    capacity``, which the router admits against); without ``parallel``, no bound. Set
    ``capacity`` to override it.

    ``model`` gives the model-level settings (id, owned_by); ``spec`` this replica's, by
    default the model's first replica (which must then be a fake one).
    """

    def __init__(self, model: ModelSpec, spec: FakeSpec | None = None) -> None:
        replica = model.replicas[0] if spec is None else spec
        if not isinstance(replica, FakeSpec):
            raise TypeError(f"model {model.id!r}: replica is not a fake spec")
        self._spec = replica
        self.settings = s = settings(model, replica)
        self._info = EngineInfo(
            name=f"fake:{s.model}",
            kind=replica.engine,
            model=s.model,
            context_length=s.context_length,
            owned_by=s.owned_by,
            capacity=None if s.parallel is None else s.parallel + s.max_queue,
        )
        self._started = False
        self._running = 0
        self._waiting = 0
        self._slots = asyncio.Semaphore(s.parallel or 1_000_000)
        self.generated_tokens = 0
        self.fail_after: int | None = None
        self.history: list[Generation] = []
        self._scripts: deque[tuple[Step, ...]] = deque()
        # The answers to constrained requests (see the module docstring).
        self.tool_arguments = '{"code": "I10"}'
        self.json_reply = '{"answer": "yes"}'
        entries = s.prefix_cache_entries
        self.prefix_cache = FakePrefixCache(entries, s.context_length) if entries else None

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def capacity(self) -> int | None:
        return self._info.capacity

    @capacity.setter
    def capacity(self, value: int | None) -> None:
        self._info = dataclasses.replace(self._info, capacity=value)

    @property
    def requests(self) -> list[GenerationRequest]:
        """Every request that reached generation, in order (rendered and within budget)."""
        return [g.request for g in self.history]

    def script(self, *steps: Step) -> None:
        """Answer the next unscripted request with ``steps`` instead of the echo.

        ``"text"`` yields a chunk; an exception is raised there; a GenerationChunk is
        yielded as is. Without a final chunk, one with ``stop`` and counts ends it.
        """
        self._scripts.append(steps)

    async def start(self) -> None:
        if self._spec.manifest is not None:
            try:
                digest = declared_digest(self._spec.manifest)
            except ManifestError as exc:
                raise ConfigError(f"model {self.settings.model!r}: {exc}") from None
            self._info = dataclasses.replace(self._info, weights_sha256=digest)
        self._started = True

    async def close(self) -> None:
        self._started = False

    async def render_chat(self, messages: tuple[Message, ...]) -> Prompt:
        """``role: content`` lines and ``assistant:`` (engine-internal; tests override it)."""
        text = "\n".join(f"{m.role}: {m.content}" for m in messages) + "\nassistant:"
        return self._tokenize(text)

    async def render_text(self, text: str) -> Prompt:
        """A completion prompt as is (engine-internal; tests override it)."""
        return self._tokenize(text)

    @staticmethod
    def _tokenize(text: str) -> Prompt:
        return Prompt(text, tuple(zlib.crc32(w.encode()) % 50_000 for w in text.split()))

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        if not self._started:
            raise UnavailableError("The model is not loaded.", code="model_not_ready")
        bound_chars(self._info, request)
        if request.messages is not None:
            prompt = await self.render_chat(request.messages)
        else:
            prompt = await self.render_text(request.prompt or "")
        in_time(request, len(prompt.token_ids))
        max_tokens = budget(request, len(prompt.token_ids), self._info.context_length)
        arrived = time.monotonic()
        self._waiting += 1
        waiting = True
        try:
            async with self._slots:
                self._waiting -= 1
                waiting = False
                self._running += 1
                try:
                    self.history.append(Generation(request, prompt, max_tokens))
                    if self.prefix_cache is not None:
                        self.prefix_cache.lookup(request.cache_salt, prompt.token_ids)
                    queue_s = time.monotonic() - arrived
                    steps = self._scripts.popleft() if self._scripts else None
                    if steps is not None:
                        body = self._play(steps, prompt, queue_s)
                    elif request.constraint is not None:
                        body = self._structured(request, prompt, max_tokens, queue_s)
                    else:
                        body = self._echo(request, prompt, max_tokens, queue_s)
                    async for chunk in body:
                        yield chunk
                finally:
                    self._running -= 1
        finally:
            if waiting:  # cancelled while it waited for a slot
                self._waiting -= 1

    async def _play(
        self, steps: tuple[Step, ...], prompt: Prompt, queue_s: float
    ) -> AsyncGenerator[GenerationChunk, None]:
        count = 0
        for step in steps:
            if isinstance(step, BaseException):
                raise step
            chunk = GenerationChunk(step) if isinstance(step, str) else step
            count += 1 if chunk.text else 0
            yield chunk
            if chunk.finish_reason is not None:
                return
        yield GenerationChunk(
            "",
            finish_reason="stop",
            prompt_tokens=len(prompt.token_ids),
            completion_tokens=count,
            queue_s=queue_s,
        )

    async def _echo(
        self, request: GenerationRequest, prompt: Prompt, max_tokens: int, queue_s: float
    ) -> AsyncGenerator[GenerationChunk, None]:
        words = prompt.text.split()
        matcher = StopMatcher(request.sampling.stop)
        count = 0
        finish: str = "stop"
        for i, word in enumerate(words):
            if count >= max_tokens:
                finish = "length"
                break
            if self.fail_after is not None and count >= self.fail_after:
                raise EngineError("fake engine failure", code="engine_error")
            await asyncio.sleep(self.settings.token_delay_s)
            count += 1
            self.generated_tokens += 1
            text = matcher.feed(word if i == 0 else " " + word)
            if text:
                yield GenerationChunk(text, logprobs=_logprobs(request, text, count - 1))
            if matcher.stopped:
                break
        tail = matcher.flush()
        yield GenerationChunk(
            tail,
            finish_reason="length" if finish == "length" else "stop",
            prompt_tokens=len(prompt.token_ids),
            completion_tokens=count,
            queue_s=queue_s,
        )

    async def _structured(
        self, request: GenerationRequest, prompt: Prompt, max_tokens: int, queue_s: float
    ) -> AsyncGenerator[GenerationChunk, None]:
        """The scripted answer to a constrained request (see the module docstring)."""
        constraint = request.constraint
        assert constraint is not None
        tool = constraint.kind == "tool"
        reply = self.tool_arguments if tool else self.json_reply
        pieces = [reply[i : i + PIECE_CHARS] for i in range(0, len(reply), PIECE_CHARS)]
        finish: FinishReason = "tool_calls" if tool else "stop"
        if len(pieces) > max_tokens:
            pieces, finish = pieces[:max_tokens], "length"
        if tool:
            name = constraint.name or request.tools[0].name
            call_id = "call_" + f"{zlib.crc32(request.request_id.encode()):024d}"
            yield GenerationChunk("", tool_calls=(ToolCallDelta(0, call_id, name),))
        for i, piece in enumerate(pieces):
            await asyncio.sleep(self.settings.token_delay_s)
            self.generated_tokens += 1
            logprobs = _logprobs(request, piece, i)
            if tool:
                yield GenerationChunk(
                    "", tool_calls=(ToolCallDelta(0, arguments=piece),), logprobs=logprobs
                )
            else:
                yield GenerationChunk(piece, logprobs=logprobs)
        yield GenerationChunk(
            "",
            finish_reason=finish,
            prompt_tokens=len(prompt.token_ids),
            completion_tokens=len(pieces),
            queue_s=queue_s,
        )

    async def health(self) -> Health:
        return self.health_now()

    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        """The prefix cache's counts (:class:`medserve.engines.base.PrefixCacheReporter`),
        or None when ``prefix_cache_entries`` is 0."""
        return None if self.prefix_cache is None else self.prefix_cache.stats()

    def health_now(self) -> Health:
        """Readiness and load from memory (:class:`medserve.engines.base.LocalHealth`)."""
        return Health(ready=self._started, running=self._running, waiting=self._waiting)
