"""The engine boundary: what the gateway hands an engine and what it gets back.

Engines never see the HTTP wire format. The web layer parses a request into a frozen
:class:`GenerationRequest` (prompt already rendered and tokenized, sampling resolved and
checked against the context window), and an engine only streams :class:`GenerationChunk`
values back. Streaming is the only generation path; a non-streaming response drains it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length"]
Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message, text only (content parts are joined by the web layer)."""

    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class Prompt:
    """A prompt as the model will see it: the rendered text and its token ids."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Sampling:
    """Resolved sampling parameters: request values, else the model's defaults."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repeat_penalty: float
    frequency_penalty: float
    presence_penalty: float
    seed: int
    stop: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """A validated request. Only the web layer's validation builds these."""

    request_id: str
    model: str
    prompt: Prompt
    sampling: Sampling
    user: str | None = None
    # time.monotonic() by which the request must be done (504 after): set from its arrival,
    # so rendering and waiting count. None: the engine's timeout_s from submission.
    deadline: float | None = None


@dataclass(frozen=True, slots=True)
class GenerationChunk:
    """A piece of generated text. The last chunk carries the finish reason and counts."""

    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    queue_s: float | None = None  # last chunk: time the request waited for a slot


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
    # many bytes (or characters, never more than bytes) cannot fit: the web layer refuses
    # it before rendering or tokenizing anything.
    max_token_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class Health:
    """Engine readiness as seen by ``/ready``."""

    ready: bool
    running: int = 0
    waiting: int = 0
    rejected: int = 0  # requests refused since start because every slot and the queue were full


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

    async def render_chat(self, messages: tuple[Message, ...]) -> Prompt:
        """Apply the model's chat template and tokenize (with generation prompt)."""
        ...

    async def render_text(self, text: str) -> Prompt:
        """Tokenize a plain completion prompt."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        """Stream the completion. Closing the iterator early stops generation."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stop ``request_id`` if it is generating; no-op otherwise."""

    async def health(self) -> Health:
        """Readiness and load."""
        ...
