"""The facts of one HTTP exchange, filled in as the request moves through the server.

The middleware creates an :class:`Exchange` per request and keeps it on the request's
state; routes and serving add what they learn (model, tokens, finish reason, keyed hashes);
the access log and the audit log read it at the end. Identifiers and counts only: there
is deliberately no field that could hold a prompt or a completion.

Every field that comes from the client is bounded before it is kept: the method is one of
:data:`METHODS` or ``"OTHER"``, the client address is an IP address or ``"invalid"`` (a
trusted proxy's ``X-Forwarded-For`` can hold anything), the model is set only once it
was found among the served ones, and ``user`` (OpenAI's free-text field) is kept here but
recorded only as a keyed hash and never logged. The request id is generated; the error
is our own code.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import time
import uuid
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.types import Scope

from medserve.engines.base import GenerationRequest, Tool
from medserve.errors import MedserveError

# RFC 9110's methods and PATCH (RFC 5789): a bounded set; anything else is "OTHER".
METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
OTHER_METHOD = "OTHER"
INVALID_CLIENT = "invalid"


def method_of(scope: Scope) -> str:
    """The request's method if it is a standard one, else ``"OTHER"``."""
    method = str(scope.get("method", ""))
    return method if method in METHODS else OTHER_METHOD


def client_of(scope: Scope) -> str | None:
    """The client's IP address (normalised), ``"invalid"`` if it is not one, None if unknown."""
    client = scope.get("client")
    if not client:
        return None
    try:
        return str(ipaddress.ip_address(str(client[0])))
    except ValueError:
        return INVALID_CLIENT


@dataclass(slots=True)
class Exchange:
    request_id: str
    method: str
    client: str | None = None
    started: float = field(default_factory=time.perf_counter)
    endpoint: str = "unmatched"
    status: int = 0
    model: str | None = None
    engine: str | None = None
    replica: str | None = None  # the engine replica that answers: "KIND:INDEX" (llamacpp:0)
    attempts: int = 0  # engines asked for this answer (more than 1: failed over)
    fallback: bool | None = None  # whether that engine is a fallback engine (other weights)
    weights_sha256: str | None = None  # its weights' sha256 (EngineInfo), when known
    user: str | None = None
    key_id: str | None = None
    stream: bool | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    prompt_hmac: str | None = None
    completion_hmac: str | None = None
    content_sha256: str | None = None
    # Structured answers: the constraint's kind (json_object, json_schema, tool), its
    # schema's sha256 (never the schema: property names can name patient fields), and
    # how many tools the request offered and the digest of their definitions.
    constraint: str | None = None
    schema_sha256: str | None = None
    tools: int | None = None
    tools_sha256: str | None = None
    audited: bool = False
    # Generation timing, for the metrics (seconds).
    queue_s: float | None = None
    ttft_s: float | None = None
    token_gaps_s: list[float] = field(default_factory=list)
    last_token_at: float | None = None

    @classmethod
    def begin(cls, scope: Scope) -> Exchange:
        """A new exchange for ``scope``, with a fresh id and bounded client facts."""
        return cls(uuid.uuid4().hex, method_of(scope), client=client_of(scope))

    def structured(self, request: GenerationRequest) -> None:
        """Note what ``request`` asks of its answer's shape (bounded values and a digest)."""
        c = request.constraint
        self.constraint = None if c is None else c.kind
        self.schema_sha256 = c.sha256 if c is not None and c.sha256 else None
        self.tools = len(request.tools) or None
        self.tools_sha256 = tools_digest(request.tools) if request.tools else None

    def failed(self, exc: MedserveError) -> None:
        """Note the error's code (or type): bounded values, never its message."""
        self.error = exc.code or exc.type

    def token(self) -> None:
        """Note that a piece of generated text is going out now."""
        now = time.perf_counter()
        if self.last_token_at is None:
            self.ttft_s = now - self.started
        else:
            self.token_gaps_s.append(now - self.last_token_at)
        self.last_token_at = now

    def latency_ms(self) -> float:
        return round((time.perf_counter() - self.started) * 1000, 1)


def exchange(request: Request) -> Exchange:
    """The exchange of ``request`` (set by :class:`medserve.api.middleware.RequestContext`)."""
    ex: Exchange = request.state.exchange
    return ex


def tools_digest(tools: tuple[Tool, ...]) -> str:
    """sha256 (hex) of the tools a request offered, as the compact JSON array
    ``[{"name", "description", "parameters", "strict"}, ...]`` in the request's order (each
    ``parameters`` the schema's JSON value as the client sent it): what the audit record
    holds of them (descriptions and schemas are client text)."""
    listed = [
        {
            "name": t.name,
            "description": t.description,
            "parameters": json.loads(t.parameters),
            "strict": t.strict,
        }
        for t in tools
    ]
    text = json.dumps(listed, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()
