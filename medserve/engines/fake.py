"""A deterministic engine for tests and demos: it echoes the prompt back word by word.

It goes through the same request path as a real engine (rendering, token counts, stop
sequences, max_tokens, cancellation), so the gateway can be tested without a model. Each
word is one "token"; generation ends with ``stop`` once the whole prompt has been echoed.

:class:`FakeSpec` is its registry entry (``engine = "fake"``), one member of the replica
union in :class:`medserve.config.ModelSpec`.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from medserve.engines.base import (
    EngineInfo,
    GenerationChunk,
    GenerationRequest,
    Health,
    Message,
    Prompt,
)
from medserve.engines.stops import StopMatcher
from medserve.errors import EngineError, OverloadedError

if TYPE_CHECKING:
    from medserve.config import ModelSpec

DEFAULT_CONTEXT = 2048


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


class FakeEngine:
    """Echo engine. ``fail_after`` makes it raise an EngineError after that many tokens;
    ``parallel`` and ``max_queue`` in its spec bound it like the real engine.

    ``model`` gives the model-level settings (id, owned_by); ``spec`` this replica's, by
    default the model's first replica (which must then be a fake one).
    """

    def __init__(self, model: ModelSpec, spec: FakeSpec | None = None) -> None:
        replica = model.replicas[0] if spec is None else spec
        if not isinstance(replica, FakeSpec):
            raise TypeError(f"model {model.id!r}: replica is not a fake spec")
        self._spec = spec = replica
        self._info = EngineInfo(
            name=f"fake:{model.id}",
            kind=spec.engine,
            model=model.id,
            context_length=spec.context_length or DEFAULT_CONTEXT,
            owned_by=model.owned_by,
        )
        self._started = False
        self._active: set[str] = set()
        self._aborted: set[str] = set()
        self.generated_tokens = 0
        self.fail_after: int | None = None
        self.requests: list[GenerationRequest] = []
        # With `parallel` set, like the real engine: that many run, `max_queue` wait, more
        # are refused (503).
        self._slots = asyncio.Semaphore(spec.parallel or 1_000_000)
        self._admitted = 0
        self.rejected = 0

    @property
    def info(self) -> EngineInfo:
        return self._info

    async def start(self) -> None:
        self._started = True

    async def close(self) -> None:
        self._started = False

    async def render_chat(self, messages: tuple[Message, ...]) -> Prompt:
        text = "\n".join(f"{m.role}: {m.content}" for m in messages) + "\nassistant:"
        return self._tokenize(text)

    async def render_text(self, text: str) -> Prompt:
        return self._tokenize(text)

    @staticmethod
    def _tokenize(text: str) -> Prompt:
        return Prompt(text, tuple(zlib.crc32(w.encode()) % 50_000 for w in text.split()))

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        spec = self._spec
        if spec.parallel is not None and self._admitted >= spec.parallel + spec.max_queue:
            self.rejected += 1
            raise OverloadedError("Every slot of this model is busy and its queue is full.")
        self._admitted += 1
        arrived = time.monotonic()
        try:
            async with self._slots:
                async for chunk in self._echo(request, time.monotonic() - arrived):
                    yield chunk
        finally:
            self._admitted -= 1

    async def _echo(
        self, request: GenerationRequest, queue_s: float
    ) -> AsyncGenerator[GenerationChunk, None]:
        self.requests.append(request)
        words = request.prompt.text.split()
        matcher = StopMatcher(request.sampling.stop)
        count = 0
        finish: str = "stop"
        self._active.add(request.request_id)
        try:
            for i, word in enumerate(words):
                if request.request_id in self._aborted:
                    return
                if count >= request.sampling.max_tokens:
                    finish = "length"
                    break
                if self.fail_after is not None and count >= self.fail_after:
                    raise EngineError("fake engine failure", code="engine_error")
                await asyncio.sleep(self._spec.token_delay_s)
                count += 1
                self.generated_tokens += 1
                text = matcher.feed(word if i == 0 else " " + word)
                if text:
                    yield GenerationChunk(text)
                if matcher.stopped:
                    break
            tail = matcher.flush()
            yield GenerationChunk(
                tail,
                finish_reason="length" if finish == "length" else "stop",
                prompt_tokens=len(request.prompt.token_ids),
                completion_tokens=count,
                queue_s=queue_s,
            )
        finally:
            self._active.discard(request.request_id)
            self._aborted.discard(request.request_id)

    async def abort(self, request_id: str) -> None:
        if request_id in self._active:
            self._aborted.add(request_id)

    async def health(self) -> Health:
        running = len(self._active)
        return Health(
            ready=self._started,
            running=running,
            waiting=self._admitted - running,
            rejected=self.rejected,
        )
