"""What one audit record holds, and its canonical bytes.

A record is a flat JSON object serialised one way only (sorted keys, no spaces, UTF-8).
Those exact bytes are what the chain hash covers and what the store keeps; verification
never re-serialises, so no JSON library's float or escape formatting can break a chain.

There is no field for text: prompts and completions appear only as keyed hashes
(``prompt_hmac``, ``completion_hmac``) and, when content capture is on, as the SHA-256 of
their encrypted form (``content_sha256``), which lives in a separate, purgeable table. The
request's ``user`` (free text: it may be a patient's name) is kept as ``user_hmac``, the
keyed hash of its UTF-8 text, which ``medserve audit hash`` computes for a suspect value.
Records written before this field existed carry ``user`` in clear; they still verify.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, Literal

VERSION = 1
GENESIS = bytes(32)  # the "previous hash" of record 1

Kind = Literal["request", "event"]


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """One HTTP request as the auditor saw it. Identifiers and counts only, never text."""

    request_id: str
    method: str
    endpoint: str
    status: int
    client: str | None = None
    key_id: str | None = None
    user_hmac: str | None = None  # keyed hash of OpenAI's free-text `user`, never the text
    model: str | None = None
    engine: str | None = None
    # The engine replica that answered, "KIND:INDEX" (e.g. llamacpp:0). Records written
    # before `instance` existed have `replica` naming the gateway instead.
    replica: str | None = None
    instance: str | None = None  # the gateway that wrote the record (Settings.instance)
    attempts: int | None = None  # engines asked (2+: failed over); absent in older records
    # Whether the engine asked last (the one that answered) is a fallback engine, with
    # other weights than the model's replicas; and those weights' sha256 (EngineInfo.
    # weights_sha256: from the artifact manifest, None without one). Null on records of
    # requests that reached no engine; absent in older records.
    fallback: bool | None = None
    weights_sha256: str | None = None
    error: str | None = None
    stream: bool | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_ms: float | None = None
    finish_reason: str | None = None
    prompt_hmac: str | None = None
    completion_hmac: str | None = None
    content_sha256: str | None = None
    # Structured answers (absent in older records): the constraint on the answer's shape
    # (json_object, json_schema or tool: a forced tool call), the sha256 of its schema's
    # canonical JSON (never the schema: property names can name patient fields), and how
    # many tools the request offered (null: none) and the sha256 of their definitions
    # (medserve.api.exchange.tools_digest; they shape the answer like the prompt does).
    constraint: str | None = None
    schema_sha256: str | None = None
    tools: int | None = None
    tools_sha256: str | None = None

    def fields(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it deep-copies, and this runs once per request.
        return {"kind": "request", **{name: getattr(self, name) for name in REQUEST_FIELDS}}


REQUEST_FIELDS = tuple(f.name for f in fields(RequestFacts))


@dataclass(frozen=True, slots=True)
class EventFacts:
    """An administrative or security event: server start/stop, config loaded, key changes."""

    event: str
    instance: str | None = None  # old event records call it `replica`
    details: dict[str, Any] = field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        return {
            "kind": "event",
            "event": self.event,
            "instance": self.instance,
            "details": self.details,
        }


Facts = RequestFacts | EventFacts


def journal_ids(bodies: Iterable[bytes]) -> set[int]:
    """The key journal entries (``details.journal``: their ``n``) that the event records
    among ``bodies`` copy (:meth:`medserve.api.security.Security.audit_key_changes`)."""
    found: set[int] = set()
    for raw in bodies:
        try:
            item = json.loads(bytes(raw))
        except ValueError:
            continue
        details = item.get("details") if isinstance(item, dict) else None
        n = details.get("journal") if isinstance(details, dict) else None
        if item.get("kind") == "event" and isinstance(n, int):
            found.add(n)
    return found


def now() -> str:
    """UTC time as ``2026-11-25T03:31:34.123456Z``: fixed width, so text order is time order."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical(data: dict[str, Any]) -> bytes:
    """The one serialisation of a record or checkpoint."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def body(facts: Facts, seq: int, ts: str) -> bytes:
    return canonical({"v": VERSION, "seq": seq, "ts": ts, **facts.fields()})


def chat_message(
    role: str,
    content: str,
    tool_calls: Sequence[tuple[str, str, str]] = (),
    tool_call_id: str | None = None,
) -> dict[str, Any]:
    """One message as ``prompt_hmac`` covers it: ``{"role", "content"}``, then, only when
    present, an assistant's ``tool_calls`` as ``[{"id", "name", "arguments"}]`` (from
    (id, name, arguments)) and a tool message's ``tool_call_id``, so that a message
    without them hashes as it always did."""
    message: dict[str, Any] = {"role": role, "content": content}
    if tool_calls:
        message["tool_calls"] = [{"id": i, "name": n, "arguments": a} for i, n, a in tool_calls]
    if tool_call_id is not None:
        message["tool_call_id"] = tool_call_id
    return message


def chat_input(messages: Sequence[tuple[str, str] | Mapping[str, Any]]) -> bytes:
    """The form of a chat request's messages that ``prompt_hmac`` covers: each message
    (role, content), or a :func:`chat_message`, as JSON in order.

    Completion prompts are hashed as their UTF-8 text. An auditor holding a suspect text
    computes the same hash with ``medserve audit hash`` and looks for it in an export.
    """
    given = [m if isinstance(m, Mapping) else {"role": m[0], "content": m[1]} for m in messages]
    return json.dumps(given, ensure_ascii=False, separators=(",", ":")).encode()


def parse_time(value: str) -> str:
    """A user-given ISO 8601 time (date alone, or with a zone) in the record ``ts`` format."""
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
