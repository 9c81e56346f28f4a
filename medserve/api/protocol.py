"""OpenAI wire models, in the order of OpenAI's API reference.

Only schemas live here; turning a request into a :class:`GenerationRequest` is
:mod:`medserve.api.serving`'s job (structured answers: :mod:`medserve.api.structured`).
Parameters medserve understands but does not implement (n>1, logit_bias, the legacy
``functions``, ...) are accepted by the schema and refused there with a 400 that names
them, rather than silently ignored. Unknown fields are ignored, as OpenAI's own clients add
new ones over time.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, WithJsonSchema
from pydantic_core import PydanticCustomError


def _utf8(text: str) -> str:
    """Refuse a string that has no UTF-8 form: a lone surrogate, as JSON's ``"\\ud83d"``
    escape gives when a client cuts an emoji in half. Python's JSON parser accepts it, and
    it would fail deep in the engine, the audit log or the tokenizer instead."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise PydanticCustomError("unicode", "must be valid Unicode text") from None
    return text


def _utf8_tree(value: Any) -> Any:
    """:func:`_utf8` for every string (keys too) in a JSON value of any shape. The error
    names the field that holds the value, never a key inside it: keys are client text."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            _utf8(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return value


def _logit_bias(value: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's shape: token ids (decimal strings) to numbers from -100 to 100."""
    for key, bias in value.items():
        if not _TOKEN_ID.fullmatch(key):
            raise PydanticCustomError("logit_bias_key", "keys must be token ids")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
            raise PydanticCustomError("logit_bias_value", "biases must be numbers from -100 to 100")
    return value


_TOKEN_ID = re.compile(r"[0-9]{1,10}")

# Every string that comes from the client's JSON is one of these: it must have a UTF-8 form.
# (A length limit goes before the check, in the same Annotated, so that pydantic reports
# it as a string's length.)
Text = Annotated[str, AfterValidator(_utf8)]
# A JSON value medserve does not model (tool and schema definitions): its strings too.
JsonValue = Annotated[Any, AfterValidator(_utf8_tree)]
JsonObject = Annotated[dict[str, Any], AfterValidator(_utf8_tree)]
# Numbers as OpenAI takes them: a JSON number (an integer is a number), never a string
# such as "0.5" or a boolean, never NaN or Infinity (Python's JSON parser reads those).
Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]
Integer = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
LogitBias = Annotated[
    dict[str, Any],
    AfterValidator(_utf8_tree),
    AfterValidator(_logit_bias),
    WithJsonSchema(
        {
            "type": "object",
            "additionalProperties": {"type": "integer", "minimum": -100, "maximum": 100},
        }
    ),
]

# At most 4 stop sequences (as OpenAI), each bounded: matching cost grows with their length.
StopText = Annotated[str, Field(max_length=256), AfterValidator(_utf8)]
Stop = StopText | Annotated[list[StopText], Field(max_length=4)] | None
# OpenAI's seed is an int64; medserve maps it into llama.cpp's range (serving.SEED_RANGE).
INT64 = 2**63


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Wire):
    type: Literal["text"]
    text: Text


# OpenAI's pattern for function and json_schema names.
Name = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
# A tool call's id, as a client echoes it back (OpenAI's and vLLM's are under 64 chars).
CallId = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_utf8)]


class FunctionCallIn(_Wire):
    """An assistant message's call: the function's name and its arguments as JSON text."""

    name: Name
    arguments: Text


class ToolCallIn(_Wire):
    id: CallId
    type: Literal["function"]
    function: FunctionCallIn


class ChatMessageIn(_Wire):
    """One message. ``assistant``: ``tool_calls`` (then ``content`` may be null or empty);
    ``tool``: ``tool_call_id`` names the earlier call its content answers."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Annotated[str, Field(max_length=64), AfterValidator(_utf8)] | None = None
    tool_calls: Annotated[list[ToolCallIn], Field(max_length=128)] | None = None
    tool_call_id: CallId | None = None


class StreamOptions(_Wire):
    include_usage: Bool = False


class JsonSchemaFormat(_Wire):
    """``response_format.json_schema``: OpenAI's shape. ``schema`` is required here (OpenAI
    makes it optional; without it there is nothing to constrain to: use json_object)."""

    name: Name
    description: Text | None = None
    # The Python name avoids BaseModel's own `schema`; the wire name is `schema`.
    schema_: JsonObject = Field(alias="schema")
    strict: Bool | None = None


class ResponseFormat(_Wire):
    """``response_format``: ``text``, ``json_object``, or ``json_schema`` with its
    ``json_schema`` (one flat model rather than a tagged union, so that an error's
    parameter is ``response_format.json_schema.name`` and never a union tag)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDef(_Wire):
    """``tools[].function``: ``parameters`` is the JSON schema of the arguments (default
    an object with no declared properties)."""

    name: Name
    description: Text | None = None
    parameters: JsonObject | None = None
    strict: Bool | None = None


class ToolDef(_Wire):
    type: Literal["function"]
    function: FunctionDef


class ChosenFunction(_Wire):
    name: Name


class NamedToolChoice(_Wire):
    """``tool_choice`` naming one function: ``{"type": "function", "function": {"name"}}``."""

    type: Literal["function"]
    function: ChosenFunction


class _Sampling(_Wire):
    """Fields both generation endpoints share, in OpenAI's order.

    Ranges are those of OpenAI's API reference (openai/openai-openapi, openapi.yaml):
    penalties -2..2, temperature 0..2, top_p 0..1, n 1..128, seed an int64. medserve's
    own bounds, where OpenAI gives none: ``user`` and each stop sequence at most 256
    characters (they reach the audit log and the stop matcher).
    """

    model: Text
    frequency_penalty: Annotated[Number, Field(ge=-2.0, le=2.0)] | None = None
    logit_bias: LogitBias | None = None
    n: Annotated[Integer, Field(ge=1, le=128)] | None = None
    presence_penalty: Annotated[Number, Field(ge=-2.0, le=2.0)] | None = None
    seed: Annotated[Integer, Field(ge=-INT64, le=INT64 - 1)] | None = None
    stop: Stop = None
    stream: Bool | None = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[Number, Field(ge=0.0, le=2.0)] | None = None
    # 0 keeps only the most likely token: greedy, as in OpenAI's API and llama.cpp.
    top_p: Annotated[Number, Field(ge=0.0, le=1.0)] | None = None
    user: Annotated[str, Field(max_length=256), AfterValidator(_utf8)] | None = None
    # medserve extensions (not in the OpenAI spec; llama.cpp's server has the same names)
    top_k: Annotated[Integer, Field(ge=0)] | None = Field(
        None, description="Top-k cut; 0 disables it."
    )
    min_p: Annotated[Number, Field(ge=0.0, le=1.0)] | None = Field(None, description="Min-p cut.")
    # > 0: llama.cpp divides logits by it (0 garbles the output).
    repeat_penalty: Annotated[Number, Field(gt=0.0, le=2.0)] | None = Field(
        None, description="Multiplicative repetition penalty; 1.0 is off."
    )


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessageIn], Field(min_length=1)]
    logprobs: Bool | None = None
    top_logprobs: Annotated[Integer, Field(ge=0, le=20)] | None = None
    # OpenAI documents no minimum for these and its API refuses 0 ("expected a value >= 1").
    max_tokens: Annotated[Integer, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[Integer, Field(ge=1)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[ToolDef], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    # Accepted (OpenAI's default true): llama.cpp answers with at most one call anyway.
    parallel_tool_calls: Bool | None = None
    # The deprecated forms of tools/tool_choice: refused, naming `tools` instead.
    functions: list[JsonValue] | None = None
    function_call: JsonValue = None


class CompletionRequest(_Sampling):
    # A string, or a list (of strings or token arrays: refused by serving unless it is
    # one string).
    prompt: Text | list[JsonValue]
    best_of: Annotated[Integer, Field(ge=0, le=20)] | None = None
    echo: Bool | None = False
    logprobs: Annotated[Integer, Field(ge=0, le=5)] | None = None
    # OpenAI's default for the legacy endpoint. OpenAI allows 0, which only makes sense
    # with `echo` (refused here): medserve asks for at least one token.
    max_tokens: Annotated[Integer, Field(ge=1)] | None = 16
    suffix: Text | None = None
    # Chat's structured-answer fields, which this endpoint does not take: modelled only so
    # that serving refuses them by name instead of ignoring them (an app would believe its
    # JSON constrained).
    response_format: JsonValue = None
    tools: JsonValue = None
    tool_choice: JsonValue = None
    top_logprobs: JsonValue = None


@cache
def field_names() -> frozenset[str]:
    """Every field name of the request models: all an error's ``param`` may hold besides
    list indexes. Anything else in a validation error's location is a union branch label
    or client text (a dictionary key)."""
    models = (
        ChatCompletionRequest,
        CompletionRequest,
        ChatMessageIn,
        TextPart,
        StreamOptions,
        ToolCallIn,
        FunctionCallIn,
        ResponseFormat,
        JsonSchemaFormat,
        ToolDef,
        FunctionDef,
        NamedToolChoice,
        ChosenFunction,
    )
    return frozenset(
        info.alias or name for model in models for name, info in model.model_fields.items()
    )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class FunctionCallOut(BaseModel):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatMessageOut(BaseModel):
    """The answer's message. ``content`` is null when the answer is only tool calls;
    ``tool_calls`` is left out when there are none. Extra fields: an engine's delta fields
    beyond the text (a vLLM replica's ``reasoning_content``), merged over the stream
    (answers.DeltaFields)."""

    model_config = ConfigDict(extra="allow")

    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCallOut] | None = Field(None, exclude_if=lambda v: v is None)


class TopLogprob(BaseModel):
    """An alternative token: its text, natural-log probability and UTF-8 bytes."""

    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    """A sampled token, with the most likely alternatives (``top_logprobs`` of them)."""

    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """``choices[].logprobs`` of chat (when ``logprobs`` was true): one entry per token."""

    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    """``choices[].logprobs`` of the legacy endpoint (when ``logprobs`` was sent): per
    token its text, log-probability, alternatives (``{token: logprob}``, the sampled one
    included) and the character offset of its start in the answer's text."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
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
    logprobs: CompletionLogprobs | None = None
    finish_reason: str


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class FunctionDeltaOut(BaseModel):
    """A piece of a call: the name on its first piece only, then arguments text."""

    name: str | None = None
    arguments: str | None = None


class ToolCallDeltaOut(BaseModel):
    """A piece of tool call ``index``; ``id`` and ``type`` on its first piece only."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDeltaOut


class ChatDelta(BaseModel):
    """What a chat stream event adds: the role (first event only), then content, pieces
    of tool calls, then an engine's other delta fields as it sent them (a vLLM replica's
    ``reasoning_content``)."""

    model_config = ConfigDict(extra="allow")

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDeltaOut] | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    """One event of a chat stream. Serialised with ``exclude_unset``: a delta without
    content is ``{}``, and ``usage`` appears only when the client asked for it (null on
    every event but the last, which has no choices)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunkChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionChunk(BaseModel):
    """One event of a legacy completion stream (``usage`` as in ChatCompletionChunk)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


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
