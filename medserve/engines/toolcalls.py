"""Tool calls on llama.cpp: the chat template's view of tools and calls, and answers as calls.

Rendering (:func:`template_messages`, :func:`template_tools`): a template that mentions
tools (``tools`` in its source) gets OpenAI's shapes, as Hugging Face templates expect them
(assistant ``tool_calls`` with ``function.name``/``function.arguments`` text, ``tool``
messages with ``tool_call_id``, and ``tools=[{"type": "function", "function": {...}}]``
with parsed ``parameters``). A template that does not (the packaged SmolLM2's) gets an
assistant message's calls as JSON text in its content, one ``{"name": ..., "arguments":
...}`` object per line after any text, and a ``tool`` message as a message of role
``tool`` with the result as its content; the tool definitions are then not shown to the
model (a named or required call is still constrained to the function's schema).

Answers: a constrained request of kind ``tool`` produces JSON text that
:class:`ToolCallStream` turns into one call (``ToolCallDelta`` pieces, streamed as the
arguments come); ``tool_choice`` ``"auto"`` is served only for templates whose call format
medserve knows (:func:`auto_format`: Hermes/Qwen ``<tool_call>{json}</tool_call>``, parsed
by :class:`HermesCalls`).
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from medserve.engines.base import (
    Constraint,
    GenerationChunk,
    Message,
    Tool,
    ToolCallDelta,
)

ID_ALPHABET = string.ascii_letters + string.digits
# The envelope of a ``required`` call: name first (json_schema_grammar's prop_order).
ENVELOPE = re.compile(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"


def call_id() -> str:
    """``call_`` and 24 random letters and digits (OpenAI's shape)."""
    return "call_" + "".join(secrets.choice(ID_ALPHABET) for _ in range(24))


def supports_tools(template: str) -> bool:
    """Whether a chat template renders tool definitions (mentions ``tools``)."""
    return re.search(r"\btools\b", template) is not None


def auto_format(template: str) -> str | None:
    """The tool-call output format medserve can parse for this template, or None:
    ``hermes`` when it renders tools and its calls are ``<tool_call>...</tool_call>``."""
    if supports_tools(template) and HERMES_OPEN in template:
        return "hermes"
    return None


def template_tools(tools: tuple[Tool, ...], wrap: Callable[[str], str]) -> list[dict[str, Any]]:
    """``tools`` as Hugging Face templates take them; ``wrap`` applied to every string
    value (client text; the renderer marks it), never to keys or ``type`` values."""
    out = []
    for tool in tools:
        function: dict[str, Any] = {
            "name": wrap(tool.name),
            "parameters": _wrap_values(json.loads(tool.parameters), wrap),
        }
        if tool.description is not None:
            function["description"] = wrap(tool.description)
        out.append({"type": "function", "function": function})
    return out


def _wrap_values(value: Any, wrap: Callable[[str], str], key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _wrap_values(v, wrap, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_wrap_values(v, wrap, key) for v in value]
    if isinstance(value, str) and key != "type":
        return wrap(value)
    return value


def template_messages(
    messages: tuple[Message, ...], wrap: Callable[[str], str], tools_aware: bool
) -> list[dict[str, Any]]:
    """The messages as the template takes them, client strings passed through ``wrap``."""
    out: list[dict[str, Any]] = []
    for m in messages:
        item: dict[str, Any] = {"role": m.role, "content": wrap(m.content)}
        if m.tool_calls and tools_aware:
            item["tool_calls"] = [
                {
                    "id": wrap(c.id),
                    "type": "function",
                    "function": {"name": wrap(c.name), "arguments": wrap(c.arguments)},
                }
                for c in m.tool_calls
            ]
        elif m.tool_calls:
            lines = [m.content] if m.content else []
            lines += [_call_text(c.name, c.arguments) for c in m.tool_calls]
            item["content"] = wrap("\n".join(lines))
        if m.tool_call_id is not None and tools_aware:
            item["tool_call_id"] = wrap(m.tool_call_id)
        out.append(item)
    return out


def _call_text(name: str, arguments: str) -> str:
    try:
        args = json.loads(arguments)
    except ValueError:
        args = arguments
    return json.dumps({"name": name, "arguments": args}, ensure_ascii=False)


def client_strings(messages: tuple[Message, ...], tools: tuple[Tool, ...]) -> list[str]:
    """Every tool-related string a request carries (names, descriptions, schemas, call
    ids and arguments): client text that must never be read as control tokens."""
    out = [s for t in tools for s in (t.name, t.description or "", t.parameters)]
    for m in messages:
        out += [s for c in m.tool_calls for s in (c.id, c.name, c.arguments)]
        out += [m.tool_call_id] if m.tool_call_id is not None else []
    return out


class ToolCallStream:
    """Turns a ``tool`` constraint's generated JSON into one tool call, streamed.

    Named function: the text is the arguments; the first piece carries the id and name.
    ``required``: the text is ``{"name": ..., "arguments": ...}``; the call starts once the
    name is complete and the arguments value is forwarded as it comes, up to its end. The
    last chunk's ``stop`` becomes ``tool_calls`` when the call is complete; ``length``
    stays (the budget cut the arguments). Text chunks become empty-text chunks carrying
    ``tool_calls`` (their log-probabilities stay with them).
    """

    def __init__(self, constraint: Constraint) -> None:
        self._name = constraint.name
        self._id = call_id()
        self._started = False
        self._buffer = ""  # required: text before the arguments value
        self._scan = _ValueEnd()

    def feed(self, chunk: GenerationChunk) -> GenerationChunk:
        deltas = self._deltas(chunk.text)
        finish = chunk.finish_reason
        if finish is not None and not self._started and self._name is not None:
            # Nothing came (the budget ended first): still the named call, no arguments.
            # Under ``required`` no call is sent before its name is complete: a call with
            # an empty name would be dispatched by an app; the answer is empty, "length".
            deltas.append(ToolCallDelta(0, id=self._id, name=self._name))
            self._started = True
        if finish == "stop" and self._complete():
            finish = "tool_calls"
        return replace(chunk, text="", tool_calls=tuple(deltas), finish_reason=finish)

    def _complete(self) -> bool:
        return self._scan.done if self._name is None else True

    def _deltas(self, text: str) -> list[ToolCallDelta]:
        if not text:
            return []
        if self._name is not None:
            if not self._started:
                self._started = True
                return [ToolCallDelta(0, id=self._id, name=self._name, arguments=text)]
            return [ToolCallDelta(0, arguments=text)]
        if not self._started:
            self._buffer += text
            match = ENVELOPE.match(self._buffer)
            if match is None:
                return []
            self._started = True
            name = json.loads(match.group(1))
            rest = self._scan.feed(self._buffer[match.end() :])
            self._buffer = ""
            return [ToolCallDelta(0, id=self._id, name=name, arguments=rest)]
        rest = self._scan.feed(text)
        return [ToolCallDelta(0, arguments=rest)] if rest else []


class _ValueEnd:
    """Forwards the text of one JSON value and drops what follows it."""

    def __init__(self) -> None:
        self.done = False
        self._depth = 0
        self._string = False
        self._escape = False
        self._seen = False

    def feed(self, text: str) -> str:
        out = []
        for c in text:
            if self.done:
                break
            if self._string:
                if self._escape:
                    self._escape = False
                elif c == "\\":
                    self._escape = True
                elif c == '"':
                    self._string = False
                    self.done = self._depth == 0
            elif c in " \t\r\n,}]" and self._depth == 0 and self._seen:
                self.done = True  # the end of a top-level number or literal
                break
            elif c == '"':
                self._string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                self.done = self._depth == 0
            if not c.isspace() or self._seen:
                self._seen = True
                out.append(c)
        return "".join(out)


class HermesCalls:
    """``tool_choice`` ``auto`` on a Hermes/Qwen template: text streams as content until a
    ``<tool_call>`` begins; from there the output is held and, at the end, each
    ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` becomes a call (finish
    ``tool_calls``). A block that does not parse is returned as text."""

    def __init__(self) -> None:
        self._pending = ""  # text that may be the start of <tool_call>
        self._held = ""  # the calls' text
        self._calling = False

    def feed(self, chunk: GenerationChunk) -> GenerationChunk:
        last = chunk.finish_reason is not None
        if not self._calling:
            text = self._pending + chunk.text
            at = text.find(HERMES_OPEN)
            if at < 0:
                keep = 0 if last else _partial_suffix(text, HERMES_OPEN)
                self._pending = text[len(text) - keep :]
                return replace(chunk, text=text[: len(text) - keep])
            self._calling, self._pending = True, ""
            self._held = text[at:]
            chunk = replace(chunk, text=text[:at])
        else:
            self._held += chunk.text
            chunk = replace(chunk, text="")
        if not last:
            return chunk
        calls = _hermes(self._held)
        if calls is None:
            return replace(chunk, text=chunk.text + self._held)
        deltas = tuple(
            ToolCallDelta(i, id=call_id(), name=name, arguments=args)
            for i, (name, args) in enumerate(calls)
        )
        finish = "tool_calls" if chunk.finish_reason == "stop" else chunk.finish_reason
        return replace(chunk, tool_calls=deltas, finish_reason=finish)


def _partial_suffix(text: str, marker: str) -> int:
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _hermes(text: str) -> list[tuple[str, str]] | None:
    """The calls in ``<tool_call>...</tool_call>`` blocks, or None when one does not parse."""
    calls = []
    rest = text.strip()
    while rest:
        if not rest.startswith(HERMES_OPEN):
            return None
        end = rest.find(HERMES_CLOSE)
        body = rest[len(HERMES_OPEN) : end if end >= 0 else len(rest)]
        try:
            value = json.loads(body)
            name, args = value["name"], value.get("arguments", {})
        except (ValueError, KeyError, TypeError):
            return None
        if not isinstance(name, str):
            return None
        calls.append((name, args if isinstance(args, str) else json.dumps(args)))
        rest = rest[end + len(HERMES_CLOSE) :].strip() if end >= 0 else ""
    return calls or None
