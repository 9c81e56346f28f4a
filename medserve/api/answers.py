"""The answer on the wire: an engine's :class:`GenerationChunk` stream as OpenAI's stream
events (:class:`Events`) or as one response (:class:`Answer`), and what the audit log
records of it (:func:`audited_output`).

Shapes (OpenAI's; the models of :mod:`medserve.api.protocol` describe them):

- text: chat ``delta.content`` / ``message.content``; completions ``text``;
- tool calls (chat): streamed as ``delta.tool_calls`` ``[{index, id, type, function: {name,
  arguments}}]`` with ``id``, ``type`` and ``name`` on a call's first piece only, later
  pieces adding ``arguments`` text; joined per index into ``message.tool_calls`` (``content``
  null when the answer is only calls);
- logprobs, when the request asked for them: chat ``{"content": [{token, logprob, bytes,
  top_logprobs: [{token, logprob, bytes}]}], "refusal": null}``; completions ``{tokens,
  token_logprobs, top_logprobs: [{token: logprob}] (the sampled token included, so up to
  N+1 entries, as OpenAI), text_offset}`` where a token's offset is the length in
  characters of the tokens' text before it (from 0: the prompt is not echoed). A
  log-probability below :data:`LOGPROB_FLOOR` (minus infinity: a token the model cannot
  give) is sent as that floor, as vLLM does, since JSON has no infinity;
- other chat delta fields of an engine (``GenerationChunk.extra``, e.g. a vLLM replica's
  ``reasoning_content``): as they came when streaming, merged (:class:`DeltaFields`) into
  the message when not. They never replace ``role``, ``content`` or ``tool_calls``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from medserve.api.protocol import (
    ChatChoice,
    ChatCompletion,
    ChatLogprobs,
    ChatMessageOut,
    ChatTokenLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    FunctionCallOut,
    ToolCallOut,
    TopLogprob,
    Usage,
)
from medserve.engines.base import GenerationChunk, GenerationRequest, TokenLogprob, ToolCallDelta

Kind = Literal["chat", "completion"]
# vLLM's stand-in for a log-probability of minus infinity (JSON has no infinity).
LOGPROB_FLOOR = -9999.0
# Message fields the answer itself sets: an engine's extra delta fields never replace them
# (GenerationChunk refuses role and content there; tool calls come typed).
DECLARED = frozenset({"role", "content", "tool_calls"})
# Stream events' JSON: compact and UTF-8 unescaped, pydantic's form (see Events). One
# encoder: json.dumps with options builds a new one per call.
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Job:
    """A validated request plus what the response needs to echo."""

    kind: Kind
    request: GenerationRequest
    stream: bool
    include_usage: bool
    created: int
    # The client's input in one canonical form, for the audit log's keyed hash (and its
    # encrypted capture, when on): chat messages as JSON, or the completion prompt.
    audit_input: bytes

    @property
    def wire_id(self) -> str:
        """The response id on the wire: the exchange's id with OpenAI's prefix."""
        prefix = "chatcmpl-" if self.kind == "chat" else "cmpl-"
        return prefix + self.request.request_id


def logprob(value: float) -> float:
    """``value`` as sent: at least LOGPROB_FLOOR (minus infinity and NaN become it)."""
    return value if value >= LOGPROB_FLOOR else LOGPROB_FLOOR


def chat_logprob(t: TokenLogprob) -> dict[str, Any]:
    """One chat ``logprobs.content`` entry (ChatTokenLogprob's shape)."""
    return {
        "token": t.token,
        "logprob": logprob(t.logprob),
        "bytes": list(t.token_bytes),
        "top_logprobs": [
            {"token": a.token, "logprob": logprob(a.logprob), "bytes": list(a.token_bytes)}
            for a in t.top
        ],
    }


def completion_logprobs(entries: Sequence[TokenLogprob], offset: int) -> dict[str, Any]:
    """The legacy ``logprobs`` object of ``entries``, the first token at ``offset``."""
    tokens, values, tops, offsets = [], [], [], []
    for t in entries:
        tokens.append(t.token)
        values.append(logprob(t.logprob))
        top = {a.token: logprob(a.logprob) for a in t.top}
        top.setdefault(t.token, logprob(t.logprob))
        tops.append(top)
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def tool_call_deltas(deltas: Sequence[ToolCallDelta]) -> list[dict[str, Any]]:
    """``delta.tool_calls`` of one event (ToolCallDeltaOut's shape, unset fields left out)."""
    out = []
    for d in deltas:
        item: dict[str, Any] = {"index": d.index}
        if d.id is not None:
            item["id"], item["type"] = d.id, "function"
        function: dict[str, Any] = {} if d.name is None else {"name": d.name}
        function["arguments"] = d.arguments
        item["function"] = function
        out.append(item)
    return out


class Events:
    """Serialises one stream's events: OpenAI's chunk JSON built as dictionaries, one
    ``json`` encoding per event. The bytes are exactly what the chunk models of
    :mod:`medserve.api.protocol` (ChatCompletionChunk, CompletionChunk) give with
    ``model_dump_json(exclude_unset=True)``: the same field order, compact separators,
    UTF-8 left unescaped, and a string without a UTF-8 form (a lone surrogate) raises
    (tests/api/test_events.py holds them to it). Building three models per event instead
    cost about 6 µs more per event (measured; see tests/bench/gateway.py).

    A chat delta holds ``content`` (when there is text), ``tool_calls`` (when the chunk has
    pieces of calls), then the chunk's ``extra`` fields as the engine passed them.
    ``logprobs`` is null unless the request asked for them and the chunk carries some.
    """

    def __init__(self, job: Job) -> None:
        self.chat = job.kind == "chat"
        self.head: dict[str, Any] = {
            "id": job.wire_id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": job.created,
            "model": job.request.model,
        }
        # exclude_unset: `usage` is on every event (null until the last) only when asked.
        self.tail: dict[str, Any] = {"usage": None} if job.include_usage else {}
        self.offset = 0  # completions: characters of the tokens sent so far (text_offset)

    def role(self) -> str:
        delta = {"role": "assistant", "content": ""}
        return self._dump([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])

    def piece(
        self,
        text: str,
        finish: str | None = None,
        extra: Mapping[str, Any] | None = None,
        tool_calls: Sequence[ToolCallDelta] = (),
        logprobs: Sequence[TokenLogprob] = (),
    ) -> str:
        """One event of generated ``text`` (chat: ``tool_calls`` pieces and ``extra``
        delta fields; both: ``logprobs`` of its tokens), or the last one with its
        ``finish`` reason."""
        choice: dict[str, Any]
        if self.chat:
            delta: dict[str, Any] = {"content": text} if text else {}
            if tool_calls:
                delta["tool_calls"] = tool_call_deltas(tool_calls)
            if extra:
                delta.update((k, v) for k, v in extra.items() if k not in DECLARED)
            lp = {"content": [chat_logprob(t) for t in logprobs], "refusal": None}
            choice = {
                "index": 0,
                "delta": delta,
                "logprobs": lp if logprobs else None,
                "finish_reason": finish,
            }
        else:
            lp = None
            if logprobs:
                lp = completion_logprobs(logprobs, self.offset)
                self.offset += sum(len(t.token) for t in logprobs)
            choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}
        return self._dump([choice])

    def usage(self, usage: Usage) -> str:
        return self._dump([], {"usage": usage.model_dump()})

    def _dump(self, choices: list[dict[str, Any]], tail: dict[str, Any] | None = None) -> str:
        event = _JSON.encode(
            {**self.head, "choices": choices, **(self.tail if tail is None else tail)}
        )
        event.encode()  # raises UnicodeEncodeError, as the models' dump does, on a lone surrogate
        return event


class DeltaFields:
    """A stream's ``GenerationChunk.extra`` fields merged into one chat message's fields
    (the non-streaming answer), in the order each field first came. A string value is
    appended to the field's string so far (``reasoning_content`` pieces make the whole
    reasoning); any other value (number, boolean, list, object) replaces the field's value
    so far, so the last one wins (lists and objects are not merged); null is skipped.
    Tool calls are not among them: they are typed (``GenerationChunk.tool_calls``, joined
    by :class:`ToolCalls`)."""

    def __init__(self) -> None:
        self._fields: dict[str, Any] = {}  # a string field holds its pieces, as _Pieces

    def add(self, extra: Mapping[str, Any]) -> None:
        for name, value in extra.items():
            if value is None:
                continue
            held = self._fields.get(name)
            if not isinstance(value, str):
                self._fields[name] = value
            elif isinstance(held, _Pieces):
                held.append(value)
            else:
                self._fields[name] = _Pieces([value])

    def merged(self) -> dict[str, Any]:
        return {
            name: "".join(value) if isinstance(value, _Pieces) else value
            for name, value in self._fields.items()
        }


class _Pieces(list[str]):
    """The pieces of one string field (a list value of the upstream's stays a list)."""


class ToolCalls:
    """The answer's tool calls joined from their pieces (:class:`ToolCallDelta`): per
    index, the id and name of the piece that carried them and the arguments appended."""

    def __init__(self) -> None:
        self._calls: dict[int, tuple[list[str | None], list[str]]] = {}

    def add(self, deltas: Sequence[ToolCallDelta]) -> None:
        for d in deltas:
            head, arguments = self._calls.setdefault(d.index, ([None, None], []))
            if d.id is not None:
                head[0] = d.id
            if d.name is not None:
                head[1] = d.name
            arguments.append(d.arguments)

    def __bool__(self) -> bool:
        return bool(self._calls)

    def joined(self) -> list[dict[str, Any]]:
        """``message.tool_calls`` (ToolCallOut's shape), by index."""
        return [
            {
                "id": head[0] or "",
                "type": "function",
                "function": {"name": head[1] or "", "arguments": "".join(arguments)},
            }
            for _, (head, arguments) in sorted(self._calls.items())
        ]


def audited_output(
    text: str, fields: DeltaFields, calls: list[dict[str, Any]] | None = None
) -> str:
    """What the audit log hashes (and captures) as the answer: its text, or, when the
    answer also carried tool calls (``calls``: ``message.tool_calls``' shape) or other
    message fields the client received (``reasoning_content`` and the like,
    :class:`DeltaFields`), the JSON object of ``content``, ``tool_calls`` and those
    fields, keys sorted, so that no text sent to the client is left out of the record.
    (A plain answer's form is unchanged, so its hash is the one older records hold.)
    Logprobs are not part of it: their tokens are the answer's own, and the alternatives
    were never answered."""
    merged = {k: v for k, v in fields.merged().items() if k not in DECLARED}
    if calls:
        merged["tool_calls"] = calls
    if not merged:
        return text
    return json.dumps({"content": text, **merged}, sort_keys=True, ensure_ascii=False)


class Answer:
    """Everything one answer sent to the client, gathered from its chunks (streamed or
    not): text, extra delta fields (chat), tool calls, logprobs."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.chat = job.kind == "chat"
        self.parts: list[str] = []
        self.fields = DeltaFields()
        self.calls = ToolCalls()
        self.logprobs: list[TokenLogprob] = []

    def add(self, chunk: GenerationChunk) -> bool:
        """Take in ``chunk``; whether it carried anything for the client (an event)."""
        self.parts.append(chunk.text)
        self.logprobs.extend(chunk.logprobs)
        extra = chunk.extra if self.chat else None  # completions have no delta
        if extra:
            self.fields.add(extra)
        calls = chunk.tool_calls if self.chat else ()
        if calls:
            self.calls.add(calls)
        return bool(chunk.text or extra or calls or chunk.logprobs)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def audited(self) -> str:
        """:func:`audited_output` of the answer."""
        return audited_output(self.text, self.fields, self.calls.joined() if self.calls else None)

    def response(self, finish_reason: str, usage: Usage) -> ChatCompletion | Completion:
        """The non-streaming response (built unvalidated: the fields are the engine's)."""
        job, r, text = self.job, self.job.request, self.text
        asked = r.logprobs is not None
        if self.chat:
            entries = []
            for t in self.logprobs:
                entry = chat_logprob(t)
                top = [TopLogprob.model_construct(**a) for a in entry.pop("top_logprobs")]
                entries.append(ChatTokenLogprob.model_construct(**entry, top_logprobs=top))
            choice = ChatChoice(
                message=self._message(text),
                logprobs=ChatLogprobs.model_construct(content=entries, refusal=None)
                if asked
                else None,
                finish_reason=finish_reason,
            )
            return ChatCompletion(
                id=job.wire_id, created=job.created, model=r.model, choices=[choice], usage=usage
            )
        logprobs = (
            CompletionLogprobs.model_construct(**completion_logprobs(self.logprobs, 0))
            if asked
            else None
        )
        return Completion(
            id=job.wire_id,
            created=job.created,
            model=r.model,
            choices=[CompletionChoice(text=text, logprobs=logprobs, finish_reason=finish_reason)],
            usage=usage,
        )

    def _message(self, text: str) -> ChatMessageOut:
        """``content`` (null when the answer is only tool calls), ``tool_calls``, then the
        stream's extra delta fields merged."""
        merged = {k: v for k, v in self.fields.merged().items() if k not in DECLARED}
        calls = [
            ToolCallOut.model_construct(
                id=c["id"],
                type="function",
                function=FunctionCallOut.model_construct(**c["function"]),
            )
            for c in (self.calls.joined() if self.calls else ())
        ]
        content = None if calls and not text else text
        return ChatMessageOut.model_construct(content=content, tool_calls=calls or None, **merged)
