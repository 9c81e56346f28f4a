"""Settings: one model fed by defaults, a TOML file, ``MEDSERVE_*`` variables and CLI flags.

Precedence, highest first: CLI flags, environment, the ``--config`` file, defaults. Every
field has a safe default (loopback bind, modest limits) and a description, so
``medserve serve`` with no arguments is a safe server for the packaged model.

Models come from the registry directory (one TOML file per model, ``models/*.toml``), from
``[[models]]`` tables in the config file, or from ``--model PATH.gguf`` for a quick start;
reading them is :mod:`medserve.registry`. This module holds the settings models only.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from medserve.engines import ENGINE_KINDS, EngineSpec
from medserve.errors import ConfigError, unusable_file

MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


class SamplingDefaults(BaseModel):
    """Per-model sampling used when a request leaves a parameter out."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(0.7, ge=0.0, le=2.0, description="Default temperature.")
    top_p: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Default nucleus sampling mass (0 is greedy, as in OpenAI).",
    )
    top_k: int = Field(40, ge=0, description="Top-k cut before sampling; 0 disables it.")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="Min-p cut; 0 disables it.")
    repeat_penalty: float = Field(
        1.0,
        gt=0.0,
        le=2.0,
        description="Multiplicative repetition penalty (1.0 = off). Small models loop without it.",
    )
    max_tokens: int = Field(
        1024, ge=1, description="Completion budget when a chat request gives none."
    )


class RoutingPolicy(BaseModel):
    """How the router spreads one model's requests over its replicas and takes failing
    ones out (:mod:`medserve.health`). Defaults follow the research note's recommendations
    (shared/research/gpu-path-and-scale-out.md §16 and §Replica selection): the numbers
    there are other gateways' defaults (Envoy, the vLLM Router README), not measurements."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    health_interval_s: float = Field(
        5.0,
        gt=0,
        description="Seconds between two active health checks of each replica (vLLM: "
        "GET /health, never a generation request).",
    )
    health_timeout_s: float = Field(
        5.0,
        gt=0,
        description="Longest wait for one health check; a slower answer is a failure. At "
        "least 5 s in production: a busy vLLM answers /health late (ray#54070).",
    )
    eject_after: int = Field(
        3,
        ge=1,
        description="Consecutive failed health checks that eject a replica (a refused "
        "connection ejects at once); the first passing check readmits it.",
    )
    breaker_faults: int = Field(
        5,
        ge=1,
        description="Consecutive replica faults of real requests (5xx, unreachable, error "
        "event, no first event in time; never 4xx or client cancels) that open the "
        "replica's circuit breaker.",
    )
    breaker_open_s: float = Field(
        30.0,
        gt=0,
        description="Seconds an open breaker refuses the replica; then one trial request "
        "is let through (half-open): its success closes the breaker, its fault re-opens it.",
    )
    busy_s: float = Field(
        1.0,
        ge=0,
        description="After a replica refuses a request as full (503/429), other replicas "
        "are preferred for this long (it is not a fault); 0: no such preference.",
    )
    scrape_interval_s: float = Field(
        1.5,
        gt=0,
        description="Seconds between two reads of a vLLM replica's /metrics (waiting "
        "requests, KV-cache usage). A value older than three intervals is unknown.",
    )
    waiting_weight: float = Field(
        1.0,
        ge=0,
        description="Each request waiting in a replica's own queue (vllm:num_requests_"
        "waiting) counts as this many outstanding requests when choosing a replica.",
    )
    kv_weight: float = Field(
        4.0,
        ge=0,
        description="A replica's KV-cache usage (0 to 1) times this counts as outstanding "
        "requests when choosing (a full cache: 4 requests more, by default).",
    )
    balance: Literal["random", "ordered"] = Field(
        "random",
        description="random: the least loaded replica, ties broken at random, and with "
        "more than two candidates the better of two picked at random (power of two "
        "choices); ordered: the least loaded, ties to the earlier replica (a preference "
        "order, e.g. the local GPU first).",
    )


class ModelSpec(BaseModel):
    """One served model: its id, model-level policy and defaults, and its engine replicas.

    ``replicas`` lists the engines that can answer for the model; the router admits a
    request to the least loaded one with room (:mod:`medserve.router`). ``fallback`` lists
    engines of other weights from the same source checkpoint, asked only when no replica
    can take a request (:mod:`medserve.fallback`). ``routing`` says how a replica is
    picked and when one is out of service (:class:`RoutingPolicy`). Each entry is one
    engine's own spec, chosen by its ``engine`` key (:data:`medserve.engines.EngineSpec`).
    The flat form of one file per model, engine keys beside ``id`` (``engine``, ``path``,
    ``package``/``file``, ``threads``, ``parallel``, ``context_length``,
    ``fake_token_delay_s`` ...), still loads: it is one replica, and ``engine`` defaults to
    ``llamacpp`` there as before.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(description="The name clients send as `model`.")
    owned_by: str = Field("medserve", description="Shown in /v1/models.")
    defaults: SamplingDefaults = Field(
        default_factory=SamplingDefaults, description="Sampling defaults for this model."
    )
    timeout_s: float = Field(
        600.0, gt=0, description="Longest a request may wait and run before it is cut (504)."
    )
    max_messages: int = Field(
        1024,
        ge=1,
        description="Most messages in one chat request, checked before the chat template is "
        "rendered (400 context_length_exceeded beyond). The context window bounds it too: "
        "every message renders to at least one token, so more messages than "
        "`context_length` cannot fit.",
    )
    replicas: tuple[EngineSpec, ...] = Field(
        min_length=1,
        description="The engines that run this model, in order; each a table with `engine` "
        "(llamacpp, vllm, fake) and that engine's settings.",
    )
    replica_failover: bool = Field(
        True,
        description="A replica fault before the first chunk (full, 5xx, unreachable, no first "
        "event in time) moves the request to another of `replicas`. Off: the fault is the "
        "answer, unless a fallback engine may take it.",
    )
    fallback: tuple[EngineSpec, ...] = Field(
        (),
        description="Engines with other weights of the same model (e.g. the GGUF of the "
        "checkpoint the GPU replicas' GPTQ came from), asked only when no replica can take "
        "the request. Every replica and fallback needs a `manifest`, and all of them must "
        "name the same source checkpoint; checked at start.",
    )
    fallback_enabled: bool = Field(
        True,
        description="Use `fallback`. Off: the entry is kept but its engines are not started "
        "and never answer.",
    )
    routing: RoutingPolicy = Field(
        default_factory=RoutingPolicy,
        description="Replica choice, health checks and circuit breaker ([models.routing]).",
    )
    cache_isolation: Literal["shared", "key"] = Field(
        "shared",
        description="Who may reuse prompt KV (the prefix cache) that a request of this model "
        "computed. 'shared': every request with the same leading tokens, whichever API key "
        "sent it. 'key': only requests of the same API key (sent as `cache_salt` to its "
        "engines; with auth off every request is one key). Only the shared leading tokens "
        "are ever reused, never another request's answer; but a request whose prefix is "
        "cached answers its first token sooner, so with 'shared' a key can learn from the "
        "timing whether someone recently sent the same leading text (a side channel). "
        "'key' closes it between keys, at the cost of computing a common preamble once "
        "per key.",
    )

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not MODEL_ID.match(value):
            raise ValueError("model id must be 1-128 characters of letters, digits and ._:/-")
        return value

    @model_validator(mode="before")
    @classmethod
    def _flat_form(cls, data: Any) -> Any:
        """Move the flat form's engine keys into ``replicas = [{...}]``."""
        if not isinstance(data, dict):
            return data
        flat = {key: value for key, value in data.items() if key not in MODEL_FIELDS}
        if "replicas" in data:
            if flat:
                raise ValueError(
                    "give the engine settings either inside `replicas` or flat beside `id`, "
                    f"not both (flat keys here: {', '.join(sorted(map(str, flat)))})"
                )
            return data
        model = {key: value for key, value in data.items() if key in MODEL_FIELDS}
        return {**model, "replicas": [{"engine": "llamacpp", **flat}]}

    @property
    def engine_specs(self) -> tuple[EngineSpec, ...]:
        """The engines the model runs, in order: ``replicas``, then ``fallback`` when
        ``fallback_enabled`` (one engine each; see :class:`medserve.router.Served`)."""
        return self.replicas + (self.fallback if self.fallback_enabled else ())


MODEL_FIELDS = frozenset(ModelSpec.model_fields)


class AuditSettings(BaseModel):
    """The audit log: where it lives, its keys, checkpoints, and what a write failure does."""

    # The URLs carry a password: an invalid value must not be echoed in the error.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    enabled: bool = Field(
        True,
        description="Record every request. Turning this off is for benchmarks and tests; "
        "a server holding patient data keeps it on.",
    )
    path: Path = Field(
        Path("var/audit.db"),
        description="SQLite audit log (production: /var/lib/medserve/audit.db).",
    )
    url: SecretStr | None = Field(
        None,
        description="PostgreSQL instead of `path`: a connection string, "
        "postgresql://user:password@host:5432/dbname?sslmode=verify-full (libpq's options, "
        "sslmode and sslrootcert among them, pass through). Several gateways share one "
        "database, one chain per `instance`; they need the same key_file and "
        "signing_key_file. Prefer MEDSERVE_AUDIT__URL or a libpq password file (PGPASSFILE) "
        "to a password in a config file.",
    )
    gateway_role: str = Field(
        "medserve_gateway",
        description="PostgreSQL role granted INSERT and SELECT on the audit tables, never "
        "UPDATE or DELETE (the role gateways log in as); granted when the owner migrates.",
    )
    auditor_role: str = Field(
        "medserve_auditor",
        description="PostgreSQL role granted SELECT only on the audit tables (verify, export).",
    )
    key_file: Path | None = Field(
        None,
        description="Audit secret (hex); default audit.key beside the log; created if absent. "
        "Production: another volume and owner, with a copy in escrow.",
    )
    signing_key_file: Path | None = Field(
        None,
        description="Ed25519 checkpoint key (PEM), default audit-signing.key beside the log; "
        "created if absent, with its public half (.pub).",
    )
    checkpoint_file: Path | None = Field(
        None,
        description="Also append every signed checkpoint to this file (JSON lines), kept on "
        "other storage than the log.",
    )
    checkpoint_every: int = Field(1000, ge=1, description="Records between checkpoints.")
    checkpoint_interval_s: float = Field(
        300.0, gt=0, description="Longest time between checkpoints while records arrive."
    )
    on_failure: Literal["closed", "open"] = Field(
        "closed",
        description="When a record cannot be written: 'closed' answers 503, 'open' serves "
        "anyway and counts and logs every lost record.",
    )
    capture: bool = Field(
        False,
        description="Also keep prompts and completions, encrypted (AES-256-GCM). Off: the "
        "log holds keyed hashes only.",
    )
    capture_key_file: Path | None = Field(
        None, description="Content key (hex) for capture; required when capture is on."
    )
    busy_timeout_ms: int = Field(
        5000, ge=0, description="How long a write waits for a lock before it counts as failed."
    )
    retry_after_s: int = Field(
        2, ge=1, description="Retry-After of the 503 answered while the log cannot be written."
    )

    @model_validator(mode="after")
    def _check_capture(self) -> AuditSettings:
        if self.capture and self.capture_key_file is None:
            raise ValueError("audit capture needs `capture_key_file`")
        return self

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: SecretStr | None) -> SecretStr | None:
        # A field validator: its error shows the value as SecretStr('**********').
        if value is not None and not value.get_secret_value().startswith(
            ("postgresql://", "postgres://")
        ):
            raise ValueError("audit `url` must be a postgresql:// connection string")
        return value

    def key_path(self) -> Path:
        return self.key_file or self.path.with_name("audit.key")

    def signing_key_path(self) -> Path:
        return self.signing_key_file or self.path.with_name("audit-signing.key")


class AuthSettings(BaseModel):
    """API keys: on by default. Keys live in their own SQLite file (`medserve keys`), or
    in PostgreSQL with `url`, shared by several gateways with their rate limits."""

    # The URLs carry a password: an invalid value must not be echoed in the error.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    enabled: bool = Field(
        True, description="Require an API key on every endpoint but /health (and /metrics)."
    )
    keys_path: Path = Field(
        Path("var/keys.db"), description="Keys database (production: /var/lib/medserve)."
    )
    url: SecretStr | None = Field(
        None,
        description="PostgreSQL connection string (postgresql://user@host:5432/db"
        "?sslmode=verify-full) for keys and rate limits shared by several gateways; "
        "keys_path is then unused. TLS options (sslmode, sslrootcert, sslcert, sslkey) "
        "pass through the string; keep the password out of it (PGPASSWORD or ~/.pgpass): "
        "it is never shown, logged or audited either way. Unset: the SQLite keys_path and "
        "per-process rate limits.",
    )
    refresh_s: float = Field(
        0.5,
        gt=0,
        le=60,
        description="With `url`: seconds between two checks of the keys for changes (one "
        "one-row query; the keys are reloaded only when they changed).",
    )
    stale_after_s: float = Field(
        2.0,
        gt=0,
        le=300,
        description="With `url`: a gateway whose copy of the keys has not been confirmed "
        "for this long refuses keys (503) rather than trust it: a revocation is effective "
        "on every gateway within this bound, even when the database is unreachable.",
    )
    rate_flush_s: float = Field(
        0.25,
        gt=0,
        le=10,
        description="With `url`: seconds between two writes of finished requests' tokens "
        "to the shared token buckets (the tokens-per-minute tolerance grows with it).",
    )
    dev_key: SecretStr | None = Field(
        None,
        description="One more accepted key (role admin, every model) for demos and tests; "
        "`medserve serve --dev-key` makes a random one for the run and prints it.",
    )
    metrics: Literal["open", "key"] = Field(
        "open",
        description="/metrics: 'open' to anyone who can reach the port (keep it on "
        "loopback or a scrape network), or 'key': an admin or auditor key.",
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(
            ("postgresql://", "postgres://")
        ):
            raise ValueError("auth url must be a postgresql:// connection string")
        return value

    @model_validator(mode="after")
    def _check_refresh(self) -> AuthSettings:
        if self.stale_after_s <= self.refresh_s:
            raise ValueError("auth stale_after_s must be longer than refresh_s")
        return self

    def keys_target(self) -> str | Path:
        """Where the keys live: the connection string when `url` is set, else keys_path."""
        return self.url.get_secret_value() if self.url is not None else self.keys_path

    @field_validator("dev_key")
    @classmethod
    def _check_dev_key(cls, value: SecretStr | None) -> SecretStr | None:
        # A key travels in an HTTP header: printable ASCII without spaces, as issued keys.
        secret = value.get_secret_value() if value is not None else "x"
        if not (secret.isascii() and secret.isprintable() and " " not in secret and secret):
            raise ValueError("dev_key must be printable ASCII without spaces")
        return value


class Settings(BaseSettings):
    """Server settings. Environment variables use the ``MEDSERVE_`` prefix."""

    # Errors name the setting, never echo its value: database URLs carry passwords.
    model_config = SettingsConfigDict(
        env_prefix="MEDSERVE_", env_nested_delimiter="__", extra="forbid", hide_input_in_errors=True
    )

    host: str = Field("127.0.0.1", description="Bind address. Loopback unless you mean it.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    models_dir: Path = Field(
        Path("models"), description="Registry directory: one TOML file per model."
    )
    state_dir: Path = Field(
        Path("var/state"),
        description="Working state of engines medserve runs itself: one directory per "
        "supervised vLLM instance (its log, caches, IPC sockets, status) under `vllm/` "
        "(production: /var/lib/medserve/state).",
    )
    models: list[ModelSpec] = Field(
        default_factory=list,
        description="Models declared inline ([[models]] in the config file); "
        "when set, the registry directory is not read.",
    )
    max_body_bytes: int = Field(
        2_000_000, ge=1024, description="Largest accepted request body; larger gets 413."
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        le=300,
        description="A connection must deliver a complete request head (request line and "
        "headers) this many seconds after it opens or after its previous response; else it "
        "is closed. Real clients send a head in one packet (milliseconds); 10 s leaves room "
        "for a congested ward network and stops slowloris clients from holding sockets.",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        le=600,
        description="A request body must arrive in full this many seconds after its head; "
        "else 408 and the connection is closed. 30 s lets the largest body (max_body_bytes, "
        "2 MB) through at under 70 kB/s.",
    )
    keep_alive_timeout_s: float = Field(
        5.0,
        gt=0,
        le=300,
        description="An idle connection between requests is closed after this many seconds "
        "(uvicorn's timeout_keep_alive). Clients that pool connections reconnect at no cost; "
        "5 s covers a client's think time between chained calls.",
    )
    max_connections: int = Field(
        256,
        ge=1,
        le=65536,
        description="Open client connections served at once; a connection beyond them gets "
        "503 + Retry-After and is closed. 256: well above the engines' slots plus wait queues "
        "(tens of requests) and far below the default limit of 1024 open files.",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="Addresses or networks (CIDR) of reverse proxies whose X-Forwarded-For and "
        "X-Forwarded-Proto headers are believed. Empty (default): proxy headers are ignored "
        "and the audited client is the connecting address.",
    )
    drain_timeout_s: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM: stop taking requests (503) and give in-flight ones this long "
        "to finish before exiting.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level of medserve's own loggers."
    )
    auth: AuthSettings = Field(default_factory=AuthSettings, description="API keys.")
    tls_certfile: Path | None = Field(
        None, description="Serve HTTPS with this certificate chain (PEM), with tls_keyfile."
    )
    tls_keyfile: Path | None = Field(None, description="Private key (PEM) for tls_certfile.")
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Browser origins allowed to call the API (CORS); empty: CORS off.",
    )
    egress_allow: list[str] = Field(
        default_factory=list,
        description="Hosts (names or IPs) besides loopback that medserve may connect to: "
        "upstream engine servers. Everything else is refused by the egress guard.",
    )
    instance: str = Field(
        default_factory=socket.gethostname,
        # Env and file names spelled out: an alias replaces the MEDSERVE_ prefix.
        validation_alias=AliasChoices(
            "instance", "MEDSERVE_INSTANCE", "replica", "MEDSERVE_REPLICA"
        ),
        description="This gateway's name in audit records (`instance`) and metrics (the "
        "`instance` label); default: the host name. Deprecated spelling, still accepted: "
        "`replica` / MEDSERVE_REPLICA (before engine replicas existed it named this server).",
    )
    audit: AuditSettings = Field(
        default_factory=AuditSettings, description="The tamper-evident audit log."
    )

    def database_urls(self) -> list[str]:
        """The PostgreSQL URLs configured (``[audit] url``, ``[auth] url``), with their
        passwords: for connecting and the egress guard only, never for showing."""
        return [u.get_secret_value() for u in (self.audit.url, self.auth.url) if u is not None]

    @field_validator("trusted_proxies")
    @classmethod
    def _check_proxies(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(
                    "trusted_proxies entries must be IP addresses or networks (CIDR)"
                ) from None
        return value

    @model_validator(mode="after")
    def _check_tls(self) -> Settings:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError(
                "TLS needs both tls_certfile and tls_keyfile (--ssl-certfile/--ssl-keyfile)"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Flags (init) beat the environment, which beats the TOML file. No .env files:
        # a stray .env must not silently reconfigure a clinical server.
        return (init_settings, env_settings, _ConfigFile(settings_cls))


class _ConfigFile(TomlConfigSettingsSource):
    """The ``--config`` TOML file; paths in it are relative to the file, not the cwd."""

    def __call__(self) -> dict[str, Any]:
        data = super().__call__()
        file = self.config.get("toml_file")
        if not isinstance(file, Path):
            return data
        base = file.parent
        for name in ("models_dir", "state_dir"):
            if isinstance(data.get(name), str):
                data[name] = base / data[name]
        for model in data.get("models") or []:
            if isinstance(model, dict):
                engines = [*(model.get("replicas") or []), *(model.get("fallback") or [])]
                for entry in [model, *engines]:
                    for name in REPLICA_PATHS:
                        if isinstance(entry, dict) and isinstance(entry.get(name), str):
                            entry[name] = base / entry[name]
                    launch = entry.get("launch") if isinstance(entry, dict) else None
                    if isinstance(launch, dict) and isinstance(launch.get("python"), str):
                        # With `command`, `model` is the container's path: left as written.
                        for name in ("python", "model"):
                            if isinstance(launch.get(name), str):
                                launch[name] = base / launch[name]
        audit = data.get("audit")
        if isinstance(audit, dict):
            for name in AUDIT_PATHS:
                if isinstance(audit.get(name), str):
                    audit[name] = base / audit[name]
        auth = data.get("auth")
        if isinstance(auth, dict) and isinstance(auth.get("keys_path"), str):
            auth["keys_path"] = base / auth["keys_path"]
        for name in ("tls_certfile", "tls_keyfile"):
            if isinstance(data.get(name), str):
                data[name] = base / data[name]
        return data


AUDIT_PATHS = ("path", "key_file", "signing_key_file", "checkpoint_file", "capture_key_file")
# Replica fields that are files: relative ones are relative to the file that names them.
REPLICA_PATHS = ("path", "manifest", "ca_file")
# ModelSpec fields that hold engine tables (the union's tag sits in their locations).
ENGINE_LISTS = ("replicas", "fallback")


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from an optional TOML file, the environment and ``overrides``.

    ``overrides`` are CLI flags; ``None`` values mean "not given" and are dropped.
    """
    flags = {key: value for key, value in overrides.items() if value is not None}
    try:
        if config is not None and not config.is_file():
            raise ConfigError(f"config file not found: {config}")
    except OSError as exc:
        raise ConfigError(unusable_file(exc, "config file", config)) from None
    # pydantic-settings reads the TOML path from the class config; a subclass per call
    # keeps Settings itself free of any global "current config file".
    source = type(
        "FileSettings",
        (Settings,),
        {"model_config": {**Settings.model_config, "toml_file": config}},
    )
    try:
        settings: Settings = source(**flags)
        return settings
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {config} is not valid TOML: {exc}") from exc
    except OSError as exc:  # a file that exists but cannot be read (mode, owner)
        raise ConfigError(unusable_file(exc, "config file", config)) from None
    except ValidationError as exc:
        raise ConfigError(f"invalid settings: {describe(exc)}") from exc


def describe(exc: ValidationError, prefix: str = "", flat: bool = False) -> str:
    """One line per error, each naming its field as written: ``models.x.replicas[0].path``.

    ``prefix`` goes before every location; the union's engine tag (pydantic puts it in the
    location after the replica index) is left out; ``flat`` leaves ``replicas[0]`` out too,
    for a model written in the flat form, whose engine keys sit beside ``id``.
    """
    lines = []
    for error in exc.errors():
        loc = list(error["loc"])
        if flat and loc[:2] == ["replicas", 0]:
            loc = loc[2:] if len(loc) < 3 or loc[2] not in ENGINE_KINDS else loc[3:]
        name = prefix
        for i, part in enumerate(loc):
            tag = i >= 2 and loc[i - 2] in ENGINE_LISTS and isinstance(loc[i - 1], int)
            if isinstance(part, int):
                name += f"[{part}]"
            elif not (tag and part in ENGINE_KINDS):
                name += f".{part}" if name else str(part)
        lines.append(f"{name or 'model'}: {error['msg']}")
    return "; ".join(lines)
