"""Structured answers on the way in: a chat request's ``response_format``, ``tools``,
``tool_choice``, tool-call history and ``logprobs`` parsed into the engine seam's types
(:class:`medserve.engines.base.Constraint`, :class:`Tool`, :class:`Message`...).

What is accepted (OpenAI's shapes; the reasons for each 400 are in the functions below):

- ``response_format``: ``text`` (no constraint), ``json_object`` (any JSON object),
  ``json_schema`` (``name``, ``schema``, ``strict``, ``description``). The schema is checked
  by :func:`medserve.engines.grammar.check_schema` (a keyword the grammar cannot enforce is
  a 400 naming the keyword) and travels as compact JSON text (:func:`schema_json`) with
  its sha256.
- ``tools`` (functions only, unique names) and ``tool_choice`` (``none``, ``auto``,
  ``required`` or a named function; ``auto`` when tools come without one, as OpenAI).
  ``required`` and a named function become a ``tool`` constraint: the answer is one call.
  ``parallel_tool_calls`` is accepted and has no effect: an answer holds at most one call
  on llama.cpp (a vLLM replica decides for itself). The deprecated ``functions`` and
  ``function_call`` are refused with a 400 that says to use ``tools``.
- ``tool_calls`` on assistant messages and ``tool`` messages answering one of them by
  ``tool_call_id``.
- ``logprobs`` (chat: true, with ``top_logprobs`` 0..20 alternatives; completions: 0..5).

Errors name the parameter, never a value: names, schemas and descriptions are client text
that can name patient fields.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

from medserve.api.protocol import (
    ChatCompletionRequest,
    ChatMessageIn,
    CompletionRequest,
    ResponseFormat,
)
from medserve.engines.base import Constraint, Message, NamedTool, Tool, ToolCall, ToolChoice
from medserve.engines.grammar import check_schema
from medserve.errors import InvalidRequestError, UnsupportedParameterError

# A function's parameters when the client gave none (OpenAI: "omitting parameters defines
# a function with an empty parameter list").
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def schema_json(value: Any) -> str:
    """The one text form of a schema: no spaces, UTF-8 left unescaped, and the client's
    key order kept, not sorted: the order of ``properties`` is the order the answer's keys
    are generated in, on llama.cpp's grammar (required properties first, in schema order)
    as in OpenAI's structured outputs, and a schema that puts ``reasoning`` before
    ``answer``, or a call's ``name`` before its ``arguments``, means it."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def schema_constraint(
    kind: Literal["json_schema", "tool"], schema: Any, name: str | None, strict: bool
) -> Constraint:
    """A Constraint holding ``schema`` as :func:`schema_json` text and its sha256 (hex of
    that text's UTF-8)."""
    text = schema_json(schema)
    return Constraint(kind, text, hashlib.sha256(text.encode()).hexdigest(), name, strict)


@dataclass(frozen=True, slots=True)
class Structure:
    """What a chat request asks of its answer's shape (``GenerationRequest``'s fields of
    the same names): all empty for a plain request."""

    constraint: Constraint | None = None
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice | None = None
    logprobs: int | None = None


def chat_structure(body: ChatCompletionRequest) -> Structure:
    """Parse a chat request's structured-answer fields, or raise the 400 naming the field.

    Raises UnsupportedParameterError for ``functions``/``function_call`` and
    InvalidRequestError for: ``response_format`` json_schema without ``json_schema``, a
    schema the grammar cannot enforce (``check_schema``), a repeated tool name, function
    parameters that are not an object schema, ``tool_choice`` without ``tools`` or naming
    no function among them, a forcing ``tool_choice`` together with a JSON
    ``response_format``, ``top_logprobs`` without ``logprobs``, ``stop`` with a JSON
    ``response_format`` or a forcing ``tool_choice``.
    """
    if body.functions or body.function_call not in (None, "none"):
        param = "functions" if body.functions else "function_call"
        raise UnsupportedParameterError(
            f"`{param}` is deprecated and not supported by medserve: use `tools` and "
            "`tool_choice`.",
            param=param,
        )
    constraint = _response_format(body.response_format)
    tools, parameters = _tools(body)
    choice: ToolChoice | None = None
    if body.tool_choice is not None:
        if not tools:
            raise InvalidRequestError(
                "`tool_choice` is only allowed when `tools` are given.", param="tool_choice"
            )
        if isinstance(body.tool_choice, str):
            choice = body.tool_choice
        else:
            choice = NamedTool(body.tool_choice.function.name)
    elif tools:
        choice = "auto"  # OpenAI's default when tools are present
    forced = _tool_constraint(choice, tools, parameters)
    if forced is not None:
        if constraint is not None:
            raise InvalidRequestError(
                "A JSON `response_format` cannot be combined with a `tool_choice` that "
                "forces a call (`required` or a named function): the answer is the call.",
                param="response_format",
            )
        constraint = forced
    if constraint is not None and body.stop:
        # A stop sequence would end the answer inside its JSON, and the answer would say
        # "stop" over a cut object or a call without a name.
        raise InvalidRequestError(
            "`stop` cannot be combined with a JSON `response_format` or a `tool_choice` "
            "that forces a call: a stop sequence would cut the JSON.",
            param="stop",
        )
    return Structure(constraint, tools, choice, _chat_logprobs(body))


def _response_format(rf: ResponseFormat | None) -> Constraint | None:
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return Constraint("json_object")
    if rf.json_schema is None:
        raise InvalidRequestError(
            "Missing required parameter: 'response_format.json_schema'.",
            param="response_format.json_schema",
        )
    js = rf.json_schema
    check_schema(js.schema_, param="response_format")
    return schema_constraint("json_schema", js.schema_, js.name, bool(js.strict))


def _tools(body: ChatCompletionRequest) -> tuple[tuple[Tool, ...], list[dict[str, Any]]]:
    """The request's tools, and each one's parameters schema (parsed) in the same order."""
    tools: list[Tool] = []
    parameters: list[dict[str, Any]] = []
    for i, t in enumerate(body.tools or ()):
        f = t.function
        if any(f.name == seen.name for seen in tools):
            raise InvalidRequestError(
                "Tool names must be unique: this one repeats an earlier tool's name.",
                param=f"tools[{i}].function.name",
            )
        params = EMPTY_PARAMETERS if f.parameters is None else f.parameters
        param = f"tools[{i}].function.parameters"
        if params.get("type", "object") != "object":
            raise InvalidRequestError(
                "A function's parameters must be a JSON schema of type object.", param=param
            )
        check_schema(params, param=param)
        tools.append(Tool(f.name, schema_json(params), f.description, bool(f.strict)))
        parameters.append(params)
    return tuple(tools), parameters


def _tool_constraint(
    choice: ToolChoice | None, tools: tuple[Tool, ...], parameters: list[dict[str, Any]]
) -> Constraint | None:
    """The ``tool`` constraint of a forcing ``tool_choice`` (see Constraint's docstring)."""
    if isinstance(choice, NamedTool):
        for tool, params in zip(tools, parameters, strict=True):
            if tool.name == choice.name:
                return schema_constraint("tool", params, tool.name, tool.strict)
        raise InvalidRequestError(
            "`tool_choice` names a function that is not among `tools`.", param="tool_choice"
        )
    if choice != "required":
        return None
    any_of = [
        {
            "type": "object",
            # name first: the model says which function before writing its arguments
            "properties": {"name": {"const": tool.name}, "arguments": params},
            "required": ["name", "arguments"],
        }
        for tool, params in zip(tools, parameters, strict=True)
    ]
    return schema_constraint("tool", {"anyOf": any_of}, None, all(t.strict for t in tools))


def _chat_logprobs(body: ChatCompletionRequest) -> int | None:
    """``GenerationRequest.logprobs``: None, or the alternatives wanted per token."""
    if body.top_logprobs is not None and body.logprobs is not True:
        raise InvalidRequestError(
            "`top_logprobs` is only allowed when `logprobs` is true.", param="top_logprobs"
        )
    return (body.top_logprobs or 0) if body.logprobs else None


def completion_logprobs(body: CompletionRequest) -> int | None:
    """``GenerationRequest.logprobs`` of a legacy completion: its ``logprobs`` (0..5)."""
    return body.logprobs


def chat_messages(messages: list[ChatMessageIn]) -> tuple[Message, ...]:
    """The messages as the engine takes them (``developer`` is ``system``; text parts
    joined). Raises InvalidRequestError naming ``messages[i]...`` for: no content (an
    assistant message with ``tool_calls`` may have none), ``tool_calls`` on another role
    than assistant, ``tool_call_id`` on another role than tool, a tool message without
    one or answering no call of an earlier assistant message."""
    out: list[Message] = []
    called: set[str] = set()
    for i, m in enumerate(messages):
        calls = tuple(
            ToolCall(c.id, c.function.name, c.function.arguments) for c in m.tool_calls or ()
        )
        if calls and m.role != "assistant":
            raise InvalidRequestError(
                "Only assistant messages carry `tool_calls`.", param=f"messages[{i}].tool_calls"
            )
        if m.content is None and not calls:
            raise InvalidRequestError(
                "Every message needs text content.", param=f"messages[{i}].content"
            )
        if m.role == "tool":
            if m.tool_call_id is None:
                raise InvalidRequestError(
                    "Missing required parameter: 'tool_call_id' (a tool message answers a call).",
                    param=f"messages[{i}].tool_call_id",
                )
            if m.tool_call_id not in called:
                raise InvalidRequestError(
                    "A tool message must answer a tool call of an earlier assistant message.",
                    param=f"messages[{i}].tool_call_id",
                )
        elif m.tool_call_id is not None:
            raise InvalidRequestError(
                "Only tool messages carry `tool_call_id`.", param=f"messages[{i}].tool_call_id"
            )
        called.update(c.id for c in calls)
        if m.content is None:
            text = ""
        else:
            text = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        role = "system" if m.role == "developer" else m.role
        out.append(Message(role, text, calls, m.tool_call_id))
    return tuple(out)
