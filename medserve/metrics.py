"""Prometheus metrics: medserve's own registry, ``medserve_`` names, base units, bounded labels.

Labels only ever take values from sets the operator controls: ``model`` is a served model
id (or "" when the request named none that exists, however long and random the name it
sent), ``endpoint`` a route template or "unmatched", ``status`` one of the HTTP statuses
medserve itself answers, ``engine``/``instance`` from the configuration, ``replica`` an
engine replica as ``kind:index`` (never its URL), ``outcome``/``state`` from fixed sets.
Never a prompt, a user, a key, a request id or a raw path.

Request metrics are observed once per request from its :class:`Exchange`; engine load,
readiness, prefix-cache and audit counters are read at scrape time from the objects that
own them, so there is one source of truth and nothing to keep in sync. vLLM's own ``vllm:``
metrics are scraped from vLLM directly, under their own names (see deploy/prometheus).
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from medserve import __version__
from medserve.audit.store import StoreStats
from medserve.auth import AUTH_REASONS
from medserve.engines.base import Health, PrefixCacheStats
from medserve.health import BREAKER_STATES, STATUSES, ReplicaView

# What one attempt on a replica came to (serving's classification): the replica answered
# (ok), failed (fault), refused as full (busy); or the client erred or left.
ATTEMPT_OUTCOMES = ("ok", "fault", "busy", "client_error", "cancelled")
# Constraints on an answer's shape (engines.base.ConstraintKind): the `kind` label's values.
CONSTRAINT_KINDS = ("json_object", "json_schema", "tool")

# Seconds. Wide enough for a 135M model on two CPU cores and an 8B model on an H100.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
HTTP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
AUDIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


@dataclass
class RequestObservation:
    """What one finished request contributes; built from the request's Exchange."""

    model: str
    endpoint: str
    status: int
    duration_s: float
    generation: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_s: float | None = None
    error: str | None = None
    ttft_s: float | None = None
    token_gaps_s: list[float] = field(default_factory=list)
    constraint: str | None = None  # one of CONSTRAINT_KINDS, or None


@dataclass(frozen=True)
class EngineState:
    """A model's engines as seen at scrape time: ``health`` the model's (all its engines
    added up), ``kinds`` each engine kind of its primary replicas (fallback engines left
    out: their state is in ``medserve_replica_state``) mapped to (any of them started,
    any of them ready and admissible). ``prefix_cache``: the model's engines' prefix
    caches added up (:meth:`medserve.router.Router.prefix_cache`), None when none has one."""

    model: str
    kinds: dict[str, tuple[bool, bool]]
    health: Health
    load_seconds: float | None
    prefix_cache: PrefixCacheStats | None = None


class Metrics:
    """The registry and every metric medserve exports."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "medserve_requests",
            "HTTP requests answered, by model, route template and status.",
            ["model", "endpoint", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "medserve_request_duration_seconds",
            "Time from request received to response complete, every route.",
            ["endpoint"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "medserve_e2e_request_latency_seconds",
            "Generation requests: received to last token, including queueing.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "medserve_request_queue_seconds",
            "Generation requests: time waiting for a decoding slot.",
            ["model"],
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "medserve_time_to_first_token_seconds",
            "Generation requests: received to first generated text.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "medserve_inter_token_latency_seconds",
            "Time between successive pieces of generated text of one request.",
            ["model"],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "medserve_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r
        )
        self.generation_tokens = Counter(
            "medserve_generation_tokens", "Tokens generated.", ["model"], registry=r
        )
        self.constrained = Counter(
            "medserve_constrained_requests",
            "Generation requests whose answer was constrained to a shape, by model and kind: "
            "json_object, json_schema (response_format) or tool (tool_choice required or "
            "named); counted once the request was parsed, whatever its outcome.",
            ["model", "kind"],
            registry=r,
        )
        self.disconnects = Counter(
            "medserve_client_disconnects",
            "Requests whose client left before the response completed.",
            ["model"],
            registry=r,
        )
        self.auth_failures = Counter(
            "medserve_auth_failures",
            "Requests refused by authentication (401) or authorization (403), by reason.",
            ["reason"],
            registry=r,
        )
        for reason in AUTH_REASONS.values():
            self.auth_failures.labels(reason)
        self.egress_refusals = Counter(
            "medserve_egress_refusals",
            "Outbound connections refused by the egress guard (any is an incident).",
            registry=r,
        )
        self.audit_write = Histogram(
            "medserve_audit_write_seconds",
            "Time to make one batch of audit records durable (group commit).",
            buckets=AUDIT_BUCKETS,
            registry=r,
        )
        self.rate_limit_check = Histogram(
            "medserve_rate_limit_check_seconds",
            "Time of one shared rate-limit admission in PostgreSQL (one round trip; only "
            "keys with limits, only with [auth] url).",
            buckets=AUDIT_BUCKETS,
            registry=r,
        )
        self.rate_limit_unavailable = Counter(
            "medserve_rate_limit_unavailable",
            "Requests of limited keys refused with 503 because the shared rate limits "
            "could not be checked in PostgreSQL.",
            registry=r,
        )
        self.attempts = Counter(
            "medserve_replica_attempts",
            "Attempts to answer a request on one replica (several per request when it "
            "failed over), by model, engine kind, replica (kind:index) and outcome: ok, "
            "fault, busy, client_error, cancelled.",
            ["model", "engine", "replica", "outcome"],
            registry=r,
        )
        self.fallback_answers = Counter(
            "medserve_fallback_answers",
            "Requests answered by one of the model's fallback engines (other weights of "
            "the same checkpoint, e.g. CPU when the GPU replicas cannot take it), by model "
            "and engine kind; counted when the fallback engine's first chunk came.",
            ["model", "engine"],
            registry=r,
        )
        info = Gauge(
            "medserve_build_info",
            "Always 1; labels say which medserve and Python run here.",
            ["version", "python", "instance"],
            registry=r,
        )
        info.labels(__version__, platform.python_version(), instance).set(1)
        self._engines: list[EngineState] = []
        self._replicas: list[ReplicaView] = []
        self._audit: Callable[[], StoreStats | None] = lambda: None
        self._keys_age: Callable[[], float | None] | None = None
        r.register(_Snapshot(self))

    def declare(self, models: Iterable[str]) -> None:
        """Create each served model's series at zero, so rates and alerts have a start."""
        for model in models:
            for family in (self.prompt_tokens, self.generation_tokens, self.disconnects):
                family.labels(model)
            for histogram in (self.e2e, self.queue, self.ttft, self.itl):
                histogram.labels(model)
            for kind in CONSTRAINT_KINDS:
                self.constrained.labels(model, kind)

    def declare_replicas(self, replicas: Iterable[ReplicaView]) -> None:
        """Create each replica's attempt series at zero, one per outcome, and each fallback
        engine kind's answer count at zero."""
        for r in replicas:
            for outcome in ATTEMPT_OUTCOMES:
                self.attempts.labels(r.model, r.kind, r.name, outcome)
            if r.fallback:
                self.fallback_answers.labels(r.model, r.kind)

    def attempt(
        self, model: str, engine: str, replica: str, outcome: str, fallback: bool = False
    ) -> None:
        """Count one attempt (``outcome`` one of ATTEMPT_OUTCOMES); an ``ok`` one on a
        fallback engine is also a fallback answer."""
        self.attempts.labels(model, engine, replica, outcome).inc()
        if fallback and outcome == "ok":
            self.fallback_answers.labels(model, engine).inc()

    def observe(self, o: RequestObservation) -> None:
        self.requests.labels(o.model, o.endpoint, str(o.status)).inc()
        self.request_duration.labels(o.endpoint).observe(o.duration_s)
        if o.status == 499:
            self.disconnects.labels(o.model).inc()
        if o.constraint in CONSTRAINT_KINDS:
            self.constrained.labels(o.model, o.constraint).inc()
        reason = AUTH_REASONS.get(o.error or "")
        if reason is not None:
            self.auth_failures.labels(reason).inc()
        if not o.generation:
            return
        self.prompt_tokens.labels(o.model).inc(o.prompt_tokens)
        self.generation_tokens.labels(o.model).inc(o.completion_tokens)
        if o.status == 200:
            self.e2e.labels(o.model).observe(o.duration_s)
        if o.queue_s is not None:
            self.queue.labels(o.model).observe(o.queue_s)
        if o.ttft_s is not None:
            self.ttft.labels(o.model).observe(o.ttft_s)
        itl = self.itl.labels(o.model)
        for gap in o.token_gaps_s:
            itl.observe(gap)

    def set_engines(self, states: Iterable[EngineState]) -> None:
        """Engine health as of this scrape (called by the /metrics route)."""
        self._engines = list(states)

    def set_replicas(self, replicas: Iterable[ReplicaView]) -> None:
        """Replica states as of this scrape (called by the /metrics route)."""
        self._replicas = list(replicas)

    def watch_audit(self, read: Callable[[], StoreStats | None]) -> None:
        """Where the audit counters come from: the store's stats, or None when audit is off."""
        self._audit = read

    def watch_keys(self, read: Callable[[], float | None]) -> None:
        """Keys in PostgreSQL: ``read()`` is the age (s) of the gateway's copy of the keys,
        None before it was first loaded (:meth:`medserve.auth.pgkeys.PgKeyStore.age`)."""
        self._keys_age = read

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Snapshot(Collector):
    """Gauges and counters owned by engines and the audit store, read at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        m = self.metrics
        labels = ["model", "engine", "instance"]
        up = GaugeMetricFamily(
            "medserve_engine_up",
            "1 if a replica of this engine kind (fallback engines not counted) is loaded.",
            labels=labels,
        )
        ready = GaugeMetricFamily(
            "medserve_engine_ready",
            "1 if a replica of this engine kind (fallback engines not counted) is ready and "
            "admits requests.",
            labels=labels,
        )
        running = GaugeMetricFamily(
            "medserve_requests_running", "Requests decoding now.", labels=["model"]
        )
        waiting = GaugeMetricFamily(
            "medserve_requests_waiting", "Requests waiting for a slot.", labels=["model"]
        )
        rejected = CounterMetricFamily(
            "medserve_queue_rejections",
            "Requests refused (503) because every slot and the queue were full.",
            labels=["model"],
        )
        load = GaugeMetricFamily(
            "medserve_model_load_seconds", "Time the model took to load.", labels=["model"]
        )
        for e in m._engines:
            for kind, (started, admits) in e.kinds.items():
                key = [e.model, kind, m.instance]
                up.add_metric(key, 1.0 if started else 0.0)
                ready.add_metric(key, 1.0 if admits else 0.0)
            running.add_metric([e.model], e.health.running)
            waiting.add_metric([e.model], e.health.waiting)
            rejected.add_metric([e.model], e.health.rejected)
            if e.load_seconds is not None:
                load.add_metric([e.model], e.load_seconds)
        yield from (up, ready, running, waiting, rejected, load)
        yield from _prefix_cache_families(m._engines)
        yield from _replica_families(m._replicas)
        if m._keys_age is not None:
            age = m._keys_age()
            keys = GaugeMetricFamily(
                "medserve_keys_age_seconds",
                "Seconds since this gateway last confirmed its copy of the keys in "
                "PostgreSQL; past [auth] stale_after_s keys are refused (503). +Inf before "
                "the first load.",
            )
            keys.add_metric([], float("inf") if age is None else age)
            yield keys
        audit = m._audit()
        enabled = GaugeMetricFamily("medserve_audit_enabled", "1 if requests are audited.")
        enabled.add_metric([], 0.0 if audit is None else 1.0)
        yield enabled
        if audit is None:
            return
        stats = audit
        written = CounterMetricFamily("medserve_audit_records", "Audit records made durable.")
        written.add_metric([], stats.written)
        failures = CounterMetricFamily(
            "medserve_audit_failures",
            "Audit records that could not be written (fail-closed: refused; fail-open: lost).",
        )
        failures.add_metric([], stats.failed)
        last = GaugeMetricFamily("medserve_audit_last_seq", "Sequence number of the last record.")
        last.add_metric([], stats.last_seq)
        checkpoints = CounterMetricFamily(
            "medserve_audit_checkpoints", "Signed audit checkpoints written."
        )
        checkpoints.add_metric([], stats.checkpoints)
        yield from (written, failures, last, checkpoints)


def _prefix_cache_families(
    engines: list[EngineState],
) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """Each model's prefix cache (KV of prompt heads kept for reuse), labelled model: the
    counts its in-process engines (llama.cpp) keep since they started, added up over the
    model's engines; no series for a model none of whose engines has one (vLLM keeps its
    own, under its ``vllm:`` names)."""
    source = "counted by the model's engines since start (llama.cpp: in this process)"
    requests = CounterMetricFamily(
        "medserve_prefix_cache_requests",
        "Prompt lookups in the prefix cache by result: hit (at least one prompt token's KV "
        f"reused) or miss; {source}.",
        labels=["model", "result"],
    )
    prompt = CounterMetricFamily(
        "medserve_prefix_cache_prompt_tokens",
        f"Prompt tokens of the requests looked up in the prefix cache; {source}.",
        labels=["model"],
    )
    reused = CounterMetricFamily(
        "medserve_prefix_cache_reused_tokens",
        "Prompt tokens whose KV was reused instead of computed (reused / prompt tokens is "
        f"the token hit rate); {source}.",
        labels=["model"],
    )
    evictions = CounterMetricFamily(
        "medserve_prefix_cache_evictions",
        "Saved prefixes dropped from host memory to stay under its bound, least recently "
        f"used first (a running request's KV is never dropped); {source}.",
        labels=["model"],
    )
    held = GaugeMetricFamily(
        "medserve_prefix_cache_bytes",
        "Host memory held by saved prefixes now (prefix_cache_mib bounds it per replica), "
        "added up over the model's engines.",
        labels=["model"],
    )
    capacity = GaugeMetricFamily(
        "medserve_prefix_cache_capacity_bytes",
        "Bound of the host memory for saved prefixes, added up over the model's engines.",
        labels=["model"],
    )
    entries = GaugeMetricFamily(
        "medserve_prefix_cache_entries",
        "Saved prefixes in host memory now, added up over the model's engines.",
        labels=["model"],
    )
    for e in engines:
        c = e.prefix_cache
        if c is None:
            continue
        requests.add_metric([e.model, "hit"], c.hits)
        requests.add_metric([e.model, "miss"], c.misses)
        prompt.add_metric([e.model], c.prompt_tokens)
        reused.add_metric([e.model], c.reused_tokens)
        evictions.add_metric([e.model], c.evictions)
        held.add_metric([e.model], c.bytes)
        capacity.add_metric([e.model], c.capacity_bytes)
        entries.add_metric([e.model], c.entries)
    yield from (requests, prompt, reused, evictions, held, capacity, entries)


def _replica_families(replicas: list[ReplicaView]) -> Iterator[GaugeMetricFamily]:
    """Per-replica state (one series per state, 1 for the current one), breaker state and
    requests outstanding, labelled model, engine kind and replica (kind:index)."""
    labels = ["model", "engine", "replica"]
    state = GaugeMetricFamily(
        "medserve_replica_state",
        "1 for the replica's current state: ready, ejected (failing health checks) or down "
        "(not started).",
        labels=[*labels, "state"],
    )
    breaker = GaugeMetricFamily(
        "medserve_replica_breaker",
        "1 for the state of the replica's circuit breaker: closed, open or half_open.",
        labels=[*labels, "state"],
    )
    outstanding = GaugeMetricFamily(
        "medserve_replica_outstanding",
        "Requests this gateway admitted to the replica and not finished.",
        labels=labels,
    )
    for r in replicas:
        key = [r.model, r.kind, r.name]
        for status in STATUSES:
            state.add_metric([*key, status], 1.0 if r.status == status else 0.0)
        for position in BREAKER_STATES:
            breaker.add_metric([*key, position], 1.0 if r.breaker == position else 0.0)
        outstanding.add_metric(key, r.outstanding)
    yield from (state, breaker, outstanding)
