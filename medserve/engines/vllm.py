"""A vLLM OpenAI-compatible server as an engine: remote or supervised replicas (the GPU path).

medserve is the gateway in front of vLLM's own OpenAI server: keys, audit, metrics and the
egress guard stay here, vLLM renders, tokenizes and generates. Each :class:`VllmEngine`
talks to one server through httpx clients (one for probes, a few for generations:
:class:`Lanes`): a remote one at ``url``, or one that medserve starts itself on 127.0.0.1
(``launch``: :mod:`medserve.engines.supervisor` runs, restarts and stops it; its port and
key are new at every start, so the clients are rebuilt each time the supervisor probes a
new run). Connections are kept and reused: a stream is read to its end after ``[DONE]``.

- ``start`` waits (bounded by ``start_timeout_s``, supervised: ``launch.startup_timeout_s``)
  for ``/health`` 200 and the served name in ``/v1/models``, and reads ``max_model_len``
  there unless ``context_length`` is set. A supervised replica with a ``manifest`` first
  checks every file of its weights directory against it.
- ``generate`` sends ``/v1/chat/completions`` (messages) or ``/v1/completions`` (prompt),
  always with ``stream: true`` and ``stream_options.include_usage``, and relays each text
  delta as it arrives (no buffering; :mod:`medserve.engines.sse` frames the bytes), with
  the delta's other non-null fields (``reasoning_content``, ``reasoning``, unknown ones) in
  ``GenerationChunk.extra``, its ``tool_calls`` pieces and the choice's ``logprobs`` as
  ``tool_calls``/``logprobs`` (:func:`~medserve.engines.vllm_wire.choice_chunk`); a
  structured request's ``response_format``, ``tools``, ``tool_choice`` and ``logprobs``
  go upstream in OpenAI's names (:func:`~medserve.engines.vllm_wire.structured_fields`).
  The last chunk carries the finish reason (OpenAI's ``stop``, ``length``,
  ``tool_calls``, ``content_filter`` as sent, but ``stop`` after tool-call pieces is
  ``tool_calls``, vLLM's named tool_choice; ``abort``/``error`` end the stream as a
  failure; any other value is ``stop``) and vLLM's exact usage counts.
  Closing the iterator, or cancelling the task that awaits it, closes the upstream
  response at any stage, so vLLM aborts the request.
- Upstream headers come from an allow-list: ``Content-Type``, ``Accept``, a fresh
  ``X-Request-Id`` per attempt (vLLM uses it as its engine request id) and the replica's
  own ``api_key``; never anything of the client's. The client's ``user`` is not sent.
- Errors are typed and never carry the upstream URL or body (which may echo the prompt):
  400 about the context window → ContextLengthError naming ``messages``/``prompt`` or the
  budget field; 400 about a tool_choice the server has no tool-call parser for → a 400
  naming ``tool_choice`` (:func:`~medserve.engines.vllm_wire.tool_choice_error`; a
  supervised replica gets one from ``launch.tool_call_parser``, a remote one from its own
  operator; replicas of one model should agree, a 400 never fails over); other
  400/413/422 → InvalidRequestError; 429/503 → OverloadedError with
  the upstream's ``Retry-After``; other statuses → EngineError; connect errors →
  UnavailableError; timeouts → RequestTimeoutError (504); an error event in the stream →
  EngineError. Only the status code and the replica name are logged.

The egress guard must let medserve reach the replica: :func:`upstream_hosts` lists the
hosts of the configured replicas, which ``medserve serve`` allows besides ``egress_allow``.
For the router (:mod:`medserve.health`), ``health`` tells a refused connection apart
(``Health.unreachable``) and ``load_stats`` reads the server's ``/metrics``
(:func:`medserve.engines.upstream.parse_load`: waiting and running requests, KV-cache
usage; old metric names too). Parsing the upstream's events and errors is in
:mod:`medserve.engines.upstream`; the request bodies and the mapping of answers and
refusals to chunks and typed errors in :mod:`medserve.engines.vllm_wire`.
A supervised replica that is restarting is not ready (``health``) and refuses requests
with UnavailableError (503) before anything is sent.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
import time
from collections.abc import AsyncGenerator, Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

import medserve.engines.vllm_wire as vw
from medserve import manifest as mf
from medserve.engines.base import (
    EngineInfo,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    Health,
    LoadStats,
)
from medserve.engines.netio import PooledTransport
from medserve.engines.pool import LANE_REQUESTS, Lanes, read_to_end
from medserve.engines.sse import SSEError, SSEFramer
from medserve.engines.supervisor import LaunchSpec, Supervisor
from medserve.engines.upstream import (
    FAILED_REASONS,
    FINISH_REASONS,
    METRICS_BYTES,
    error_message,
    parse_event,
    parse_load,
    prompt_token_bound,
)
from medserve.errors import (
    ConfigError,
    ContextLengthError,
    EngineError,
    MedserveError,
    RequestTimeoutError,
    UnavailableError,
)
from medserve.manifest import ManifestError, declared_digest

if TYPE_CHECKING:
    from medserve.config import ModelSpec

log = logging.getLogger(__name__)

# An idle connection is reused for this long, below the 5 s after which vLLM's server
# (uvicorn's default keep-alive) closes it: a request never races the server's close.
KEEPALIVE_S = 4.0


class VllmSpec(BaseModel):
    """One vLLM replica of a model: a remote server (``url``) or one medserve starts and
    supervises (``launch``), exactly one of the two; and how to talk to it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: Literal["vllm"] = Field(description="Engine kind: the union's discriminator.")
    url: str | None = Field(
        None,
        description="Base URL of one remote vLLM OpenAI server, http(s)://host:port (no "
        "path), e.g. http://gpu-node-1:8000. Its host is allowed through the egress guard.",
    )
    launch: LaunchSpec | None = Field(
        None,
        description="Instead of `url`: medserve starts this vLLM server on 127.0.0.1 and "
        "supervises it (medserve.engines.supervisor).",
    )
    manifest: Path | None = Field(
        None,
        description="manifest.json of the `medserve quantize` artifact this replica serves "
        "(e.g. the GPTQ directory): its weights' identity for the audit log and GPU -> CPU "
        "fallback, read at start. Supervised: every file of launch.model must match it or "
        "the replica refuses to start; remote: the server's files cannot be checked from "
        "here. Relative to the registry file.",
    )
    ca_file: Path | None = Field(
        None,
        description="PEM file of the CA certificate(s) that sign an https `url`'s certificate "
        "(a hospital's internal CA); default: the public CAs of certifi. Relative to the "
        "registry file.",
    )
    served_model_name: str | None = Field(
        None,
        description="The `model` sent upstream (vLLM's --served-model-name); default: "
        "the medserve model id.",
    )
    api_key: SecretStr | None = Field(
        None,
        description="The replica's own key (vLLM --api-key), sent as Bearer upstream. "
        "A client's key is never forwarded.",
    )
    context_length: int | None = Field(
        None,
        ge=16,
        description="Context window in tokens; default: the upstream's "
        "max_model_len from /v1/models at start.",
    )
    max_outstanding: int = Field(
        64,
        ge=1,
        description="Requests the router sends this replica at once; more get 503 "
        "+ Retry-After (vLLM queues what it cannot run).",
    )
    retry_after_s: int = Field(
        1, ge=1, description="Retry-After (s) when this replica is full and the upstream gave none."
    )
    connect_timeout_s: float = Field(5.0, gt=0, le=60, description="TCP/TLS connect timeout.")
    first_event_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Longest wait from sending a request to its first upstream "
        "event (vLLM queueing plus prefill); the request's own deadline may cut it shorter.",
    )
    read_timeout_s: float = Field(
        120.0, gt=0, description="Longest pause between two upstream reads once streaming."
    )
    start_timeout_s: float = Field(
        120.0,
        gt=0,
        description="Longest wait at start for /health 200 and the served name in /v1/models.",
    )
    check_budget: bool = Field(
        True,
        description="When the client set a completion budget, count the prompt's tokens with "
        "the server's POST /tokenize first: a prompt plus budget past the context window is "
        "then a 400 naming the budget field, as on llama.cpp (vLLM itself cuts the answer "
        "at the window without saying so). Counted only when the budget plus a bound on "
        "the prompt's tokens (its UTF-8 bytes plus budget_slack_tokens) passes the window. "
        "Off: never counted; a server without /tokenize (404) is not checked.",
    )
    budget_slack_tokens: int = Field(
        1024,
        ge=0,
        description="Tokens the model's chat template may add to the messages' own text "
        "(special tokens, a default system prompt): the bound that spares a request the "
        "/tokenize round trip (check_budget). Raise it for a template that adds more.",
    )
    health_ttl_s: float = Field(
        2.0, ge=0, description="How long a /health probe result is reused by /ready."
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("url must be http(s)://host[:port]")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            raise ValueError("url must be http(s)://host[:port] without path, query or user")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _check_where(self) -> VllmSpec:
        if (self.url is None) == (self.launch is None):
            raise ValueError(
                "give exactly one of `url` (a remote vLLM server) or `launch` (medserve "
                "starts and supervises vLLM)"
            )
        if self.launch is not None and self.api_key is not None:
            raise ValueError("api_key is for remote replicas; a supervised one gets a fresh key")
        return self


def tls_context(ca_file: Path | None) -> ssl.SSLContext | bool:
    """How an https replica's certificate is verified: against ``ca_file`` (PEM) when given,
    else httpx's default (certifi's public CAs). Never off."""
    return ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else True


def upstream_hosts(specs: Iterable[ModelSpec]) -> list[str]:
    """Hosts of every remote vLLM replica and fallback engine (for the egress guard's
    allow-list); supervised ones are on loopback, always allowed."""
    hosts = {
        urlsplit(r.url).hostname or ""
        for spec in specs
        for r in spec.engine_specs
        if isinstance(r, VllmSpec) and r.url is not None
    }
    return sorted(h for h in hosts if h)


class VllmEngine:
    """One vLLM OpenAI server. ``model`` gives the medserve id; ``spec`` the replica."""

    def __init__(self, model: ModelSpec, spec: VllmSpec) -> None:
        self._spec = spec
        self._model = model.id
        self._served = spec.served_model_name or model.id
        if spec.url is not None:
            parts = urlsplit(spec.url)
            where = f"{parts.hostname}:{parts.port or ''}"
        else:
            where = "supervised"
        self._info = EngineInfo(
            name=f"vllm:{model.id}@{where}",
            kind="vllm",
            model=model.id,
            context_length=spec.context_length or 0,
            owned_by=model.owned_by,
            capacity=spec.max_outstanding,
            retry_after_s=spec.retry_after_s,
        )
        self._client: httpx.AsyncClient | None = None  # probes: /health, /v1/models, /metrics
        self._lanes: Lanes | None = None  # generations and /tokenize (see Lanes)
        self._running = 0
        self._probe: tuple[float, bool] = (float("-inf"), False)
        self._refused = False
        self._no_tokenize = False  # the server answered /tokenize 404: budgets unchecked
        self._probe_lock = asyncio.Lock()
        self._supervisor: Supervisor | None = None
        if spec.launch is not None:
            self._supervisor = Supervisor(
                self._info.name, model.id, self._served, spec.launch, self._attach
            )

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def supervisor(self) -> Supervisor | None:
        """The supervisor of a supervised replica (None: remote)."""
        return self._supervisor

    def _new_client(self, url: str, key: str | None, lane: bool = False) -> httpx.AsyncClient:
        s = self._spec
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        # Every connection a lane may open is kept for reuse: httpx's default keeps 20.
        connections = s.max_outstanding + 4
        limits = httpx.Limits(
            max_connections=connections,
            max_keepalive_connections=connections,
            keepalive_expiry=KEEPALIVE_S,
        )
        verify = tls_context(s.ca_file)
        transport = None
        if lane:
            context = verify if isinstance(verify, ssl.SSLContext) else httpx.create_ssl_context()
            transport = PooledTransport(context, limits)
        return httpx.AsyncClient(
            base_url=url,
            headers=headers,
            # Timeouts of a generation are enforced per stage in generate(); these bound
            # connecting and the probes.
            timeout=httpx.Timeout(None, connect=s.connect_timeout_s, pool=s.connect_timeout_s),
            limits=limits,
            trust_env=False,  # never an HTTP(S)_PROXY from the environment
            follow_redirects=False,
            verify=verify,
            transport=transport,
        )

    def _connect(self, url: str, key: str | None) -> None:
        """Clients for the server at ``url``: the probes' and the generations' lanes (on
        :class:`~medserve.engines.netio.PooledTransport`)."""
        self._client = self._new_client(url, key)
        count = -(-self._spec.max_outstanding // LANE_REQUESTS)  # ceiling
        self._lanes = Lanes([self._new_client(url, key, lane=True) for _ in range(count)])

    async def _disconnect(self) -> None:
        client, lanes, self._client, self._lanes = self._client, self._lanes, None, None
        if client is not None:
            await client.aclose()
        if lanes is not None:
            await lanes.aclose()

    async def start(self) -> None:
        """Wait for the server: /health 200 and the served name in /v1/models.

        Raises EngineError (operator-facing: names the replica) when it is not ready within
        ``start_timeout_s`` or lacks the served name or a context length. Supervised: starts
        the server first (see :mod:`medserve.engines.supervisor`); EngineError, with the
        tail of vLLM's log, when it failed for good or is not ready within
        ``launch.startup_timeout_s`` (restarts included).
        """
        if self._spec.manifest is not None:
            try:
                digest = await asyncio.to_thread(declared_digest, self._spec.manifest)
            except ManifestError as exc:
                raise ConfigError(f"model {self._model!r}: {exc}") from None
            self._info = replace(self._info, weights_sha256=digest)
        if self._supervisor is not None:
            await self._start_supervised(self._supervisor)
            return
        s = self._spec
        assert s.url is not None
        if self._client is None:
            self._connect(s.url, s.api_key.get_secret_value() if s.api_key else None)
        deadline = time.monotonic() + s.start_timeout_s
        problem = "no answer"
        while True:
            try:
                problem = await self._check_ready()
            except (httpx.HTTPError, ValueError, AttributeError) as exc:  # unreachable, not JSON
                problem = type(exc).__name__
            except EngineError:
                await self.close()
                raise
            if not problem:
                break
            if time.monotonic() > deadline:
                await self.close()
                raise EngineError(f"{self._info.name} not ready in time: {problem}")
            await asyncio.sleep(0.5)
        self._probe = (time.monotonic(), True)
        log.info("vllm replica ready", extra={"replica": self._info.name})

    async def _start_supervised(self, supervisor: Supervisor) -> None:
        launch = self._spec.launch
        assert launch is not None
        if launch.python is not None and not launch.model.is_dir():
            raise EngineError(f"{self._info.name}: launch.model {launch.model} is not a directory")
        if self._spec.manifest is not None:
            await asyncio.to_thread(self._check_manifest, launch.model, self._spec.manifest)
        try:
            await supervisor.start()
            await supervisor.wait_ready(launch.startup_timeout_s)
        except BaseException:
            await self.close()
            raise

    def _check_manifest(self, model: Path, manifest: Path) -> None:
        """Every file of the weights directory matches its manifest (sha256), or EngineError."""
        if manifest.resolve().parent != model.resolve():
            raise EngineError(
                f"{self._info.name}: manifest {manifest} does not describe launch.model {model}"
            )
        try:
            problems = mf.check_tree(model)
        except mf.ManifestError as exc:
            raise EngineError(f"{self._info.name}: {exc}") from None
        if problems:
            raise EngineError(
                f"{self._info.name}: {model} does not match its manifest "
                f"({'; '.join(problems[:5])}): refusing to serve weights other than the "
                "ones that were quantized and evaluated"
            )

    async def _attach(self, url: str, key: str) -> str:
        """The supervisor's readiness probe: point the client at this run, then check it."""
        if self._client is None or str(self._client.base_url).rstrip("/") != url:
            await self._disconnect()
            self._connect(url, key)
            self._probe = (float("-inf"), False)
        try:
            problem = await self._check_ready()
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            return type(exc).__name__
        if not problem:
            self._probe = (time.monotonic(), True)
        return problem

    async def _check_ready(self) -> str:
        """'' when ready, else what is missing; EngineError when the server does not serve
        the name or gives no context length (waiting would not help)."""
        assert self._client is not None
        timeout = min(10.0, self._spec.start_timeout_s)
        health = await self._client.get("/health", timeout=timeout)
        if health.status_code != 200:
            return f"/health answered {health.status_code}"
        models = await self._client.get("/v1/models", timeout=timeout)
        if models.status_code in (401, 403):  # waiting would not help
            raise EngineError(
                f"{self._info.name}: /v1/models answered {models.status_code}: the server "
                "refused medserve's key (check the replica's api_key)"
            )
        if models.status_code != 200:
            return f"/v1/models answered {models.status_code}"
        entry = next(
            (m for m in models.json().get("data", []) if m.get("id") == self._served), None
        )
        if entry is None:
            raise EngineError(
                f"{self._info.name}: the upstream does not serve {self._served!r} "
                "(set served_model_name to a name its /v1/models lists)"
            )
        context = self._spec.context_length or entry.get("max_model_len")
        if not isinstance(context, int) or context < 1:
            raise EngineError(f"{self._info.name}: no max_model_len upstream; set context_length")
        self._info = _replace_context(self._info, context)
        return ""

    async def close(self) -> None:
        """Close the client; a supervised replica's server is stopped (SIGTERM, SIGKILL)."""
        if self._supervisor is not None:
            await self._supervisor.stop()
        await self._disconnect()

    def _down(self) -> str | None:
        """Why a supervised replica cannot take requests now (None: it can)."""
        sup = self._supervisor
        return sup.reason or sup.state if sup is not None and sup.state != "ready" else None

    async def health(self) -> Health:
        """Readiness from a /health probe reused for ``health_ttl_s``, plus requests in
        flight; ``unreachable`` when the last probe's connection was refused. A supervised
        replica that is not running is not ready, with the reason in ``detail``."""
        down = self._down()
        if self._client is None or down is not None:
            return Health(ready=False, running=self._running, detail=down)
        async with self._probe_lock:
            at, ok = self._probe
            if time.monotonic() - at >= self._spec.health_ttl_s:
                self._refused = False
                try:
                    r = await self._client.get("/health", timeout=5.0)
                    ok = r.status_code == 200
                except httpx.ConnectError:
                    ok, self._refused = False, True
                except httpx.HTTPError:
                    ok = False
                self._probe = (time.monotonic(), ok)
        ready = ok and self._client is not None
        return Health(ready=ready, running=self._running, unreachable=self._refused)

    async def load_stats(self) -> LoadStats | None:
        """The server's own load from its ``/metrics`` (:func:`parse_load`), or None when
        it could not be read (not started, unreachable, not 200, over METRICS_BYTES)."""
        client = self._client
        if client is None:
            return None
        try:
            async with client.stream("GET", "/metrics", timeout=5.0) as r:
                if r.status_code != 200:
                    return None
                body = bytearray()
                async for piece in r.aiter_raw():
                    body += piece
                    if len(body) > METRICS_BYTES:
                        return None
        except httpx.HTTPError:
            return None
        return parse_load(body.decode("utf-8", "replace"))

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        lanes = self._lanes
        if lanes is None:
            raise UnavailableError("The model is not loaded.", code="model_not_ready")
        if self._down() is not None:
            raise UnavailableError(
                "The model's engine is restarting; retry shortly.", code="engine_unavailable"
            )
        path, body = vw.request_body(request, self._served)
        headers = {
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
            "X-Request-Id": f"{request.request_id}-{secrets.token_hex(4)}",
        }
        first_by = time.monotonic() + self._spec.first_event_timeout_s
        if request.deadline is not None:
            first_by = min(first_by, request.deadline)
        first_timeout = first_by - time.monotonic()
        if first_timeout <= 0:
            raise RequestTimeoutError()
        self._running += 1
        try:
            with lanes.take() as client:
                await self._check_budget(client, request, body, headers, first_by)
                req = client.build_request("POST", path, json=body, headers=headers)
                try:
                    async with asyncio.timeout(first_timeout):
                        response = await client.send(req, stream=True)
                except TimeoutError:
                    raise self._timed_out("waiting for its answer") from None
                except httpx.HTTPError as exc:
                    raise self._unreachable(exc) from None
                try:
                    if response.status_code != 200:
                        raise await self._refusal(request, response)
                    async for chunk in self._relay(request, response, first_by):
                        yield chunk
                finally:
                    await response.aclose()
        finally:
            self._running -= 1

    async def _check_budget(
        self,
        client: httpx.AsyncClient,
        request: GenerationRequest,
        body: dict[str, Any],
        headers: dict[str, str],
        first_by: float,
    ) -> None:
        """Refuse a prompt plus ``max_tokens`` past the context window before generating.

        vLLM (0.32) caps a budget that does not fit at what is left of the window and
        answers ``length``: a silently shortened answer. So when the client sent a budget
        (``check_budget`` on), the prompt is counted with the server's own ``POST
        /tokenize`` (same model, messages with the generation prompt, or prompt): the
        count is exact, the chat template included. Raises ContextLengthError naming the
        input (the prompt alone does not fit) or the budget field, with ``prompt_tokens``
        set; a server without ``/tokenize`` (404: some pool gateways) is remembered and
        not asked again. Other failures are classified as for a generation. A request
        whose budget plus :func:`~medserve.engines.upstream.prompt_token_bound` fits the
        window is not counted: it fits whatever the exact count.
        """
        s = request.sampling
        if s.max_tokens is None or not self._spec.check_budget or self._no_tokenize:
            return
        bound = prompt_token_bound(body, self._spec.budget_slack_tokens)
        if bound + s.max_tokens <= self._info.context_length:
            return  # fits whatever the tokenizer: no round trip (about 20% of the CPU)
        req = client.build_request(
            "POST",
            "/tokenize",
            json=vw.tokenize_body(body),
            headers={**headers, "Accept": "application/json"},
        )
        try:
            async with asyncio.timeout(max(first_by - time.monotonic(), 0.0)):
                response = await client.send(req, stream=True)
                try:
                    if response.status_code == 404:
                        self._no_tokenize = True
                        log.warning(
                            "vllm replica has no /tokenize; budgets are not checked",
                            extra={"replica": self._info.name},
                        )
                        return
                    if response.status_code != 200:
                        raise await self._refusal(request, response)
                    count = parse_event((await response.aread()).decode("utf-8", "replace"))
                finally:
                    await response.aclose()
        except TimeoutError:
            raise self._timed_out("counting the prompt's tokens") from None
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        tokens = count.get("count") if count else None
        if not isinstance(tokens, int):
            return
        context = self._info.context_length
        if tokens >= context:
            refusal = ContextLengthError(
                f"The prompt ({tokens} tokens) does not fit this model's context window of "
                f"{context} tokens.",
                param=request.input_param,
            )
        elif tokens + s.max_tokens > context:
            refusal = ContextLengthError(
                f"The prompt ({tokens} tokens) plus {s.max_tokens_param} ({s.max_tokens}) "
                f"exceeds this model's context window of {context} tokens.",
                param=s.max_tokens_param,
            )
        else:
            return
        refusal.prompt_tokens = tokens
        raise refusal

    async def _relay(
        self, request: GenerationRequest, response: httpx.Response, first_by: float
    ) -> AsyncGenerator[GenerationChunk, None]:
        """Relay ``response``'s SSE events as chunks: the first by ``first_by`` (monotonic),
        then at most ``read_timeout_s`` between reads."""
        framer = SSEFramer()
        reads = response.aiter_raw()
        finish: FinishReason | None = None
        usage: dict[str, Any] | None = None
        deltas, called = 0, False
        first, stage = True, "waiting for its first event"
        while True:
            timeout = first_by - time.monotonic() if first else self._spec.read_timeout_s
            try:
                async with asyncio.timeout(max(timeout, 0.0)):
                    data = await anext(reads)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise self._timed_out(stage) from None
            except httpx.HTTPError as exc:
                raise self._broken(type(exc).__name__) from None
            try:
                events = framer.feed(data)
            except SSEError as exc:
                raise self._broken(str(exc)) from None
            for event in events:
                if event.data.strip() == "[DONE]":
                    yield self._last(finish, usage, deltas)
                    await read_to_end(reads)
                    return
                chunk = parse_event(event.data)
                if chunk is None or isinstance(chunk.get("error"), dict):
                    raise self._broken("an error event" if chunk else "an event that is not JSON")
                first, stage = False, "streaming"
                if isinstance(chunk.get("usage"), dict):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    try:
                        piece = vw.choice_chunk(choice)
                    except ValueError as exc:
                        raise self._broken(str(exc)) from None
                    if piece is not None:
                        deltas += 1
                        called = called or bool(piece.tool_calls)
                        yield piece
                    reason = choice.get("finish_reason")
                    if reason is not None:
                        finish = self._finish(reason)
                        # vLLM ends a named tool_choice's call with "stop", as OpenAI
                        # does; the engine contract (and llama.cpp) says "tool_calls".
                        if called and finish == "stop":
                            finish = "tool_calls"
        if finish is None:
            raise self._broken("the stream ended before a finish reason")
        yield self._last(finish, usage, deltas)

    def _finish(self, reason: object) -> FinishReason:
        """The finish reason to pass on for an upstream's ``finish_reason``; raises
        EngineError for ``abort``/``error`` (vLLM gave up on the request)."""
        known = FINISH_REASONS.get(reason) if isinstance(reason, str) else None
        if known is not None:
            return known
        if reason in FAILED_REASONS:
            raise self._broken(f"the upstream ended the request with {reason}")
        # Not logged as sent: a bounded message only (the value is the upstream's).
        log.warning(
            "vllm replica sent an unknown finish reason", extra={"replica": self._info.name}
        )
        return "stop"

    def _last(
        self, finish: FinishReason | None, usage: dict[str, Any] | None, deltas: int
    ) -> GenerationChunk:
        if finish is None:
            raise self._broken("[DONE] before a finish reason")
        if usage is None:  # include_usage was asked: an upstream that ignores it
            log.warning("vllm replica sent no usage", extra={"replica": self._info.name})
        return vw.last_chunk(finish, usage, deltas)

    async def _refusal(self, request: GenerationRequest, response: httpx.Response) -> MedserveError:
        """The typed error for a non-200 answer (its body read, bounded, never echoed)."""
        status = response.status_code
        log.warning("vllm replica refused", extra={"replica": self._info.name, "status": status})
        message, param = "", None
        if status in vw.CLIENT_FAULT:
            message, param = await error_message(response)
        return vw.refusal_error(
            request,
            status,
            message,
            param,
            response.headers.get("retry-after", ""),
            self._info.retry_after_s,
            self._info.context_length,
        )

    def _unreachable(self, exc: httpx.HTTPError) -> MedserveError:
        log.warning(
            "vllm replica unreachable",
            extra={"replica": self._info.name, "error": type(exc).__name__},
        )
        if isinstance(exc, httpx.TimeoutException):
            return self._timed_out("connecting")
        return UnavailableError("The model's engine cannot be reached.", code="engine_unavailable")

    def _timed_out(self, stage: str) -> RequestTimeoutError:
        log.warning("vllm replica timed out", extra={"replica": self._info.name, "stage": stage})
        return RequestTimeoutError("The model's engine did not answer in time.")

    def _broken(self, what: str) -> EngineError:
        log.warning(
            "vllm replica stream failed", extra={"replica": self._info.name, "problem": what}
        )
        return EngineError("The model's engine failed while generating.", code="engine_error")


def _replace_context(info: EngineInfo, context: int) -> EngineInfo:
    return replace(info, context_length=context)
