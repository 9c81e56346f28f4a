"""OpenAI wire models, in the order of OpenAI's API reference.

Only schemas live here; turning a request into a :class:`GenerationRequest` is
:mod:`medserve.api.serving`'s job. Parameters medserve understands but does not implement
(tools, logprobs, n>1, ...) are accepted by the schema and refused there with a 400 that
names them, rather than silently ignored. Unknown fields are ignored, as OpenAI's own
clients add new ones over time.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# At most 4 stop sequences (as OpenAI), each bounded: matching cost grows with their length.
StopText = Annotated[str, Field(max_length=256)]
Stop = StopText | Annotated[list[StopText], Field(max_length=4)] | None


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Wire):
    type: Literal["text"]
    text: str


class ChatMessageIn(_Wire):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=64)


class StreamOptions(_Wire):
    include_usage: bool = False


class _Sampling(_Wire):
    """Fields both generation endpoints share, in OpenAI's order."""

    model: str
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    n: int | None = Field(None, ge=1)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: Stop = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    user: str | None = Field(None, max_length=256)
    # medserve extensions (not in the OpenAI spec; llama.cpp's server has the same names)
    top_k: int | None = Field(None, ge=0, description="Top-k cut; 0 disables it.")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="Min-p cut.")
    repeat_penalty: float | None = Field(
        None, ge=0.0, le=2.0, description="Multiplicative repetition penalty; 1.0 is off."
    )


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessageIn], Field(min_length=1)]
    logprobs: bool | None = None
    top_logprobs: int | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None


class CompletionRequest(_Sampling):
    prompt: str | list[Any]
    best_of: int | None = Field(None, ge=1)
    echo: bool | None = False
    logprobs: int | None = None
    # OpenAI's default for the legacy endpoint.
    max_tokens: int | None = Field(16, ge=1)
    suffix: str | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # medserve extensions
    engine: str
    context_length: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody
