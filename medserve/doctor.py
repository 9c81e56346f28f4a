"""``medserve doctor``: the server's privacy and safety posture, checked before it starts.

Each check is ``ok``, ``warn`` or ``danger``; any ``danger`` makes the command exit 1, so
a deployment pipeline can refuse a configuration that would expose patient data (for
example a non-loopback bind without authentication or without TLS).

Each replica is one check named ``model ID replica KIND:INDEX`` (just ``model ID`` for a
single replica). A remote vLLM replica is probed once, unless ``probe`` is off: its
``/health`` (ready, or ``warn``: the router would eject it) and its ``/metrics`` (waiting,
running, KV-cache usage, or unknown). The router's own state of a replica (ejected by
failed checks, circuit breaker, requests outstanding) exists only in a running server:
its ``/ready`` lists it.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import httpx

from medserve import pgsql
from medserve.auth.keys import KeyStore, KeyStoreError
from medserve.auth.pgkeys import SCHEMA_VERSION as PG_KEYS_SCHEMA
from medserve.auth.pgkeys import PgKeyStore
from medserve.config import AuthSettings, ModelSpec, Settings
from medserve.engines.base import LoadStats
from medserve.engines.llamacpp import LlamaCppSpec
from medserve.engines.supervisor import DEFAULT_STATE_DIR, VLLM_MODULE, read_status, tail
from medserve.engines.upstream import parse_load
from medserve.engines.vllm import VllmSpec, tls_context, upstream_hosts
from medserve.errors import ConfigError
from medserve.fallback import check as check_fallback
from medserve.manifest import ManifestError, check_file, check_tree, sha256_file
from medserve.privacy import OFFLINE_ENV

Level = Literal["ok", "warn", "danger"]
PROBE_TIMEOUT_S = 5.0  # per request of a replica probe (the router's health timeout)


@dataclass(frozen=True)
class Check:
    name: str
    level: Level
    detail: str


def _pg_keys(auth: AuthSettings, probe: bool) -> Iterator[Check]:
    """Keys in PostgreSQL: the check of :func:`_pg_keys_state`, and (``probe``) whether the
    role the gateway logs in as could change the keys (it must not: a gateway reads them)."""
    assert auth.url is not None
    url = auth.url.get_secret_value()
    state = _pg_keys_state(auth, probe)
    yield state
    if not probe or state.level == "danger" or "no schema yet" in state.detail:
        return
    try:
        with pgsql.connect(
            url, connect_timeout_s=int(PROBE_TIMEOUT_S), statement_timeout_s=PROBE_TIMEOUT_S
        ) as conn:
            conn.read_only = True
            writable = [
                privilege
                for privilege in ("INSERT", "UPDATE", "DELETE", "TRUNCATE")
                if conn.execute(
                    "SELECT has_table_privilege('auth_keys', %s)", (privilege,)
                ).fetchone()
                == (True,)
            ]
    except Exception as exc:  # unreadable: the check above has said what it could
        reason = pgsql.scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else "", url)
        yield Check("keys database role", "warn", f"its rights could not be read ({reason})")
        return
    if writable:
        yield Check(
            "keys database role",
            "warn",
            f"this role may {'/'.join(writable)} API keys: gateways should log in as the "
            "gateway role (it reads the keys; the owner's URL is for `medserve keys`)",
        )


def _pg_keys_state(auth: AuthSettings, probe: bool) -> Check:
    """Keys in PostgreSQL: reachable, schema version, active keys (``probe``); read only.
    The connection string is shown without its password, and so is any error."""
    assert auth.url is not None
    store = PgKeyStore(auth.url.get_secret_value())
    where = f"in {store.shown}"
    dev = "; a dev key is configured" if auth.dev_key is not None else ""
    if not probe:
        return Check("auth", "warn" if dev else "ok", f"on; keys {where} (not probed){dev}")
    try:
        version, active = store.inspect()
    except KeyStoreError as exc:
        return Check("auth", "danger", f"on; {exc}")
    if version is None:
        return Check("auth", "warn", f"on; keys {where}: no schema yet (created on first use){dev}")
    if active is None:
        return Check(
            "auth",
            "danger",
            f"on; keys {where}: schema version {version}, this medserve knows {PG_KEYS_SCHEMA}",
        )
    level: Level = "warn" if not active or auth.dev_key else "ok"
    return Check(
        "auth",
        level,
        f"on; {active} active keys {where} (schema {version}; revocation within "
        f"{auth.stale_after_s:g} s; shared rate limits){dev}",
    )


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def checks(
    settings: Settings, models: list[ModelSpec], hash_models: bool = True, probe: bool = True
) -> Iterator[Check]:
    """Every check, in order; ``hash_models``: hash weights files; ``probe``: ask each
    remote vLLM replica for its health and load."""
    local = loopback(settings.host)
    auth = settings.auth
    tls = settings.tls_certfile is not None and settings.tls_keyfile is not None
    yield Check(
        "bind",
        "ok" if local else "warn",
        f"{settings.host}:{settings.port}" + ("" if local else " (reachable from the network)"),
    )
    if not auth.enabled:
        yield Check("auth", "danger" if not local else "warn", "off: every request is anonymous")
    elif auth.url is not None:
        yield from database_tls(auth.url.get_secret_value(), "keys database TLS")
        yield from _pg_keys(auth, probe)
    else:
        active: list[object] = []
        if not auth.keys_path.is_file():  # never create it here: doctor changes nothing
            detail = f"on; no keys database yet at {auth.keys_path} (medserve keys create)"
        else:
            try:
                keys = KeyStore(auth.keys_path).all()
                active = [k for k in keys if not k.revoked and not k.expired()]
                detail = f"on; {len(active)} active keys in {auth.keys_path}"
            except Exception as exc:  # any failure to read is what we report
                detail = f"on; keys database unreadable ({type(exc).__name__})"
        if auth.dev_key is not None:
            detail += "; a dev key is configured"
        level: Level = "warn" if (not active and auth.dev_key is None) or auth.dev_key else "ok"
        yield Check("auth", level, detail)
    if tls:
        missing = [
            p for p in (settings.tls_certfile, settings.tls_keyfile) if p and not p.is_file()
        ]
        yield Check(
            "tls",
            "danger" if missing else "ok",
            f"missing {', '.join(map(str, missing))}" if missing else f"{settings.tls_certfile}",
        )
    else:
        yield Check(
            "tls",
            "ok" if local else "danger",
            "off (loopback only)" if local else "off on a network bind: traffic in clear text",
        )
    yield Check(
        "metrics",
        "warn" if auth.metrics == "open" and not local else "ok",
        f"/metrics {auth.metrics}",
    )
    yield from _connections(settings)
    replicas = upstream_hosts(models)
    databases = pgsql.host_names(*settings.database_urls())
    allowed = ", ".join([*settings.egress_allow, *replicas, *databases]) or "loopback only"
    yield Check("egress guard", "ok", f"on at start-up; allowed: {allowed}")
    remote = [h for h in databases if not loopback(h)]
    if remote:  # the guard sees psycopg's name lookup; libpq's connect is made in C
        yield Check(
            "egress outside the guard",
            "ok",
            f"PostgreSQL at {', '.join(remote)}: libpq connects outside Python's guard; "
            "confine it with the host's firewall or a NetworkPolicy",
        )
    plain = sorted(
        {
            r.url
            for spec in models
            for r in spec.engine_specs
            if isinstance(r, VllmSpec)
            and r.url
            and r.url.startswith("http://")
            and urlsplit(r.url).hostname not in ("127.0.0.1", "localhost", "::1")
        }
    )
    if plain:
        yield Check(
            "vllm transport",
            "warn",
            f"plain http to another machine: prompts travel unencrypted to {', '.join(plain)} "
            "(use https and ca_file, or a private segment)",
        )
    differing = sorted(k for k, v in OFFLINE_ENV.items() if os.environ.get(k) not in (None, v))
    yield Check(
        "offline env",
        "ok",
        "forced at start-up: "
        + " ".join(f"{k}={v}" for k, v in OFFLINE_ENV.items())
        + (f" (overriding {', '.join(differing)})" if differing else ""),
    )
    yield from _audit(settings, probe)
    yield from _config_files(settings)
    for spec in models:
        yield from _models(spec, hash_models, probe)
        yield from _fallback(spec, hash_models)


def _connections(settings: Settings) -> Iterator[Check]:
    proxies = settings.trusted_proxies
    yield Check(
        "proxy headers",
        "warn" if any(_wide(p) for p in proxies) else "ok",
        f"X-Forwarded-For believed from {', '.join(proxies)}"
        if proxies
        else "ignored: the audited client is the connecting address",
    )
    yield Check(
        "connections",
        "ok",
        f"at most {settings.max_connections} open; request head within "
        f"{settings.header_timeout_s:g} s, body within {settings.body_timeout_s:g} s, "
        f"idle keep-alive {settings.keep_alive_timeout_s:g} s",
    )


def _wide(network: str) -> bool:
    """A trusted proxy entry that covers more than a handful of addresses."""
    net = ipaddress.ip_network(network, strict=False)
    return net.num_addresses > 256


def _audit(settings: Settings, probe: bool) -> Iterator[Check]:
    conf = settings.audit
    if not conf.enabled:
        yield Check("audit", "danger", "off: requests leave no record")
        return
    if conf.url is not None:
        yield from _audit_postgres(conf.url.get_secret_value(), conf.on_failure, probe)
    else:
        yield from _audit_file(conf.path, conf.on_failure)
    yield from _audit_keys(settings)


def database_tls(url: str, name: str) -> Iterator[Check]:
    """A check named ``name`` when ``url`` reaches a database across a network without a
    verified TLS connection (sslmode other than verify-full/verify-ca), or verifies with a
    root certificate file that is not there (libpq then refuses to connect); none else.

    Every setting is read as libpq resolves it (:func:`medserve.pgsql.libpq_options`): the
    URL's own, else the environment (``PGSSLMODE``, ``PGHOST``, ``PGHOSTADDR``,
    ``PGSSLROOTCERT``), else libpq's default (``prefer``; a local socket;
    ``~/.postgresql/root.crt``)."""
    try:
        options = pgsql.libpq_options(url)
    except ImportError:  # pragma: no cover - the extra is missing: other checks say so
        return
    except pgsql.DatabaseError as exc:
        yield Check(name, "danger", str(exc))
        return

    def listed(key: str) -> list[str]:
        return [v for v in options.get(key, ("", ""))[0].split(",") if v]

    # With hostaddr, libpq connects to those addresses (host names only what TLS checks).
    targets = listed("hostaddr") or [h for h in listed("host") if not h.startswith(("/", "@"))]
    if not any(not loopback(t) for t in targets):
        return
    sslmode, source = options.get("sslmode", ("prefer", "default"))
    said = f"sslmode={sslmode}" + ("" if source == "url" else f" (from {source})")
    if sslmode not in ("verify-full", "verify-ca"):
        yield Check(
            name,
            "danger" if sslmode in ("disable", "allow") else "warn",
            f"{said} across a network: set sslmode=verify-full (and sslrootcert)",
        )
        return
    root, root_source = options.get("sslrootcert", ("", "default"))
    if root == "system":  # the operating system's trusted roots (libpq 16 and later)
        return
    path = Path(root) if root else Path.home() / ".postgresql" / "root.crt"
    if not path.is_file():
        where = "" if root_source == "url" else f" (from {root_source})"
        yield Check(
            name,
            "danger",
            f"{said} with sslrootcert {path}{where}, which is not a file: libpq will refuse "
            "to connect; set sslrootcert to the database's CA certificate",
        )


def _audit_postgres(url: str, on_failure: str, probe: bool) -> Iterator[Check]:
    """The PostgreSQL log: TLS across a network, and (``probe``) whether it can be reached,
    its schema's version, and whether this role could change records (it must not)."""
    from medserve import pgsql

    shown = pgsql.redact(url)
    yield from database_tls(url, "audit database TLS")
    if not probe:
        yield Check("audit log", "ok", f"{shown} (not probed); on failure: {on_failure}")
        return
    try:
        from medserve.audit.pgstore import MIGRATIONS, TABLES
    except ImportError:  # pragma: no cover - the extra is missing
        yield Check("audit log", "danger", "PostgreSQL driver missing: medserve[postgres]")
        return
    try:
        with pgsql.connect(
            url, connect_timeout_s=int(PROBE_TIMEOUT_S), statement_timeout_s=PROBE_TIMEOUT_S
        ) as conn:
            conn.read_only = True
            version = conn.execute(
                "SELECT version FROM schema_version WHERE component = 'audit'"
            ).fetchone()
            writable = [
                privilege
                for privilege in ("UPDATE", "DELETE", "TRUNCATE")
                if version is not None
                and conn.execute(
                    "SELECT has_table_privilege(%s, %s)", (TABLES[1], privilege)
                ).fetchone()
                == (True,)
            ]
    except pgsql.DatabaseError as exc:
        yield Check("audit log", "danger", str(exc))
        return
    except Exception as exc:  # no schema_version yet, or no right to read it
        reason = pgsql.scrub(str(exc).strip().splitlines()[0], url)
        yield Check(
            "audit log",
            "danger",
            f"{shown}: no audit schema readable ({reason}): run "
            "`medserve audit migrate` as the owner role",
        )
        return
    known = len(MIGRATIONS)
    at = int(version[0]) if version else 0
    if at != known:
        level: Level = "danger" if at > known else "warn"
        yield Check(
            "audit log",
            level,
            f"{shown}: schema version {at}, this medserve {known}"
            + (": run `medserve audit migrate`" if at < known else ": upgrade medserve"),
        )
    else:
        yield Check("audit log", "ok", f"{shown} (schema {at}); on failure: {on_failure}")
    if writable:
        yield Check(
            "audit database role",
            "warn",
            f"this role may {'/'.join(writable)} audit records: gateways should log in as "
            "the gateway role (INSERT and SELECT only)",
        )


# Settings whose value is a secret wherever they appear in a settings file (the SecretStr
# fields of medserve.config and medserve.engines.vllm; URLs are judged by their content).
SECRET_KEYS = frozenset({"dev_key", "api_key", "password"})


def _config_files(settings: Settings) -> Iterator[Check]:
    """A settings file (``--config``, the registry's ``models/*.toml``) that holds a secret
    (a password in a URL, an API key, ...) and that other users of the machine may read:
    ``warn``, as for the audit secret's file. The detail names the settings, never a value.
    """
    config = settings.model_config.get("toml_file")
    files = [config] if isinstance(config, Path) else []
    if settings.models_dir.is_dir():
        files += sorted(settings.models_dir.glob("*.toml"))
    for path in files:
        try:
            mode = path.stat().st_mode & 0o777
            if not mode & 0o004:
                continue
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # unreadable or not TOML: load_settings reports it
            continue
        found = sorted(set(_secrets(data, "")))
        if found:
            yield Check(
                "config file",
                "warn",
                f"{path} (mode {mode:o}) holds {', '.join(found)}, and any user of this "
                "machine may read it: chmod 600 (or 640 with the service's group), or move "
                "the secret to the environment",
            )


def _secrets(value: object, name: str) -> Iterator[str]:
    """The dotted names of the settings in ``value`` (parsed TOML) that hold a secret: a
    key named like one (:data:`SECRET_KEYS`), or a URL with a password in it."""
    if isinstance(value, dict):
        for key, item in value.items():
            inner = f"{name}.{key}" if name else str(key)
            if isinstance(item, str) and item and str(key).lower() in SECRET_KEYS:
                yield inner
            else:
                yield from _secrets(item, inner)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _secrets(item, f"{name}[{i}]")
    elif isinstance(value, str) and "://" in value and pgsql.passwords_of(value):
        yield f"{name} (a password in the URL)"


def _audit_file(path: Path, on_failure: str) -> Iterator[Check]:
    directory = path.parent
    existing = next((p for p in (directory, *directory.parents) if p.exists()), None)
    writable = existing is not None and os.access(existing, os.W_OK)
    yield Check(
        "audit log",
        "ok" if writable else "danger",
        f"{path} ({'writable' if writable else 'not writable'}); on failure: {on_failure}",
    )


def _audit_keys(settings: Settings) -> Iterator[Check]:
    conf = settings.audit
    if conf.on_failure == "open":
        yield Check("audit mode", "warn", "fail-open: requests are served when records are lost")
    for name, path in (("audit secret", conf.key_path()), ("signing key", conf.signing_key_path())):
        if path.is_file():
            mode = path.stat().st_mode & 0o777
            level: Level = "warn" if mode & 0o077 else "ok"
            yield Check(name, level, f"{path} (mode {mode:o})")
        else:
            yield Check(name, "warn", f"{path} missing: created at first start")
    if conf.checkpoint_file is None:
        yield Check("checkpoints", "warn", "kept only in the log: set audit.checkpoint_file")
    if conf.capture:
        yield Check("content capture", "warn", "on: prompts and completions kept, encrypted")


def _models(spec: ModelSpec, hash_models: bool, probe: bool) -> Iterator[Check]:
    """One check per replica; a single-replica model keeps its plain name."""
    for i, replica in enumerate(spec.replicas):
        name = f"model {spec.id}"
        if len(spec.replicas) > 1:
            name += f" replica {replica.engine}:{i}"
        if isinstance(replica, LlamaCppSpec):
            yield _weights(name, spec.id, replica, hash_models)
        elif isinstance(replica, VllmSpec):
            yield from _vllm(name, spec.id, replica, hash_models, probe)
        else:
            yield Check(name, "warn", f"{replica.engine} engine (tests and demos only)")


def _fallback(spec: ModelSpec, hash_models: bool) -> Iterator[Check]:
    """A model with fallback engines: each one's weights, and whether fallback is allowed
    (every manifest names the same source checkpoint: :func:`medserve.fallback.check`)."""
    if not spec.fallback:
        return
    if not spec.fallback_enabled:
        yield Check(f"model {spec.id} fallback", "ok", "off (fallback_enabled = false)")
        return
    for i, engine in enumerate(spec.fallback):
        if isinstance(engine, LlamaCppSpec):
            yield _weights(f"model {spec.id} fallback {i}", spec.id, engine, hash_models)
    try:
        identity = check_fallback(spec)
    except ConfigError as exc:
        yield Check(f"model {spec.id} fallback", "danger", str(exc))
        return
    yield Check(
        f"model {spec.id} fallback",
        "ok",
        f"{len(spec.fallback)} fallback engine(s), same source checkpoint as the replicas "
        f"({str(identity)[:16]}...); answers say so in X-Medserve-Fallback and the audit log",
    )


def _vllm(name: str, model: str, spec: VllmSpec, hash_models: bool, probe: bool) -> Iterator[Check]:
    """A remote replica: where it is. A supervised one: its interpreter, weights (against
    the manifest) and the state its supervisor last recorded, with the log's tail when
    that run never became ready (it never saw a request, so its log holds no patient data).
    """
    launch = spec.launch
    if launch is None:
        yield _probe(name, spec, probe)
        return
    problems = []
    if launch.python is not None and not os.access(launch.python, os.X_OK):
        problems.append(f"launch.python {launch.python} is not an executable file")
    if launch.python is not None and not launch.model.is_dir():
        problems.append(f"launch.model {launch.model} is not a directory")
    elif spec.manifest is not None and hash_models:
        try:
            problems += [f"{p} (against {spec.manifest})" for p in check_tree(launch.model)]
        except ManifestError as exc:
            problems.append(str(exc))
    how = f"{launch.python} -m {VLLM_MODULE}" if launch.python else " ".join(launch.command or ())
    detail = f"supervised vLLM on 127.0.0.1: {how} --model {launch.model}"
    yield Check(name, "danger" if problems else "ok", "; ".join(problems) or detail)
    for root, status in read_status(launch.state_dir or DEFAULT_STATE_DIR, model):
        state = str(status.get("state"))
        down = state in ("failed", "crash_loop") or bool(status.get("log_shown"))
        level: Level = "warn" if down else "ok"
        text = f"{root.name}: {state}" + (f" ({status['reason']})" if status.get("reason") else "")
        if status.get("log_shown"):
            since = status.get("log_start")
            shown = tail(root / "vllm.log", 3, since if isinstance(since, int) else 0)
            shown = shown.replace("\n", " | ")
            text += f"; log tail: {shown}" if shown else ""
        yield Check(f"{name} last run", level, text)


def _probe(name: str, spec: VllmSpec, probe: bool) -> Check:
    """A remote vLLM replica: its /health and scraped load, asked once."""
    where = f"vllm at {spec.url}"
    if not probe or spec.url is None:
        return Check(name, "ok", f"{where} (not probed)")
    key = spec.api_key
    headers = {"Authorization": f"Bearer {key.get_secret_value()}"} if key else {}
    try:
        with httpx.Client(
            base_url=spec.url,
            headers=headers,
            timeout=PROBE_TIMEOUT_S,
            trust_env=False,
            verify=tls_context(spec.ca_file),
        ) as client:
            status = client.get("/health").status_code
            if status != 200:
                return Check(name, "warn", f"{where}: /health answered {status} (not ready)")
            metrics = client.get("/metrics")
    except httpx.HTTPError as exc:
        return Check(name, "warn", f"{where}: unreachable ({type(exc).__name__})")
    load = parse_load(metrics.text) if metrics.status_code == 200 else LoadStats()
    return Check(name, "ok", f"{where}: ready; {describe_load(load)}")


def describe_load(load: LoadStats) -> str:
    """``waiting 2, running 5, kv cache 41%``, ``unknown`` for what is not known."""

    def known(value: object) -> str:
        return "unknown" if value is None else str(value)

    kv = load.kv_cache_usage
    usage = "unknown" if kv is None else f"{kv:.0%}"
    return f"waiting {known(load.waiting)}, running {known(load.running)}, kv cache {usage}"


def _weights(name: str, model: str, spec: LlamaCppSpec, hash_models: bool) -> Check:
    try:
        path = spec.weights(model)
    except ConfigError as exc:
        return Check(name, "danger", str(exc))
    if spec.manifest is not None and hash_models:
        try:
            digest = check_file(spec.manifest, path)
        except ManifestError as exc:
            return Check(name, "danger", str(exc))
        return Check(name, "ok", f"{path} sha256 {digest} (matches its manifest)")
    digest = f" sha256 {sha256_file(path)}" if hash_models else ""
    return Check(name, "ok", f"{path}{digest}")
