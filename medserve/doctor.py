"""``medserve doctor``: the server's privacy and safety posture, checked before it starts.

Each check is ``ok``, ``warn`` or ``danger``; any ``danger`` makes the command exit 1, so
a deployment pipeline can refuse a configuration that would expose patient data (for
example a non-loopback bind without authentication or without TLS).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from medserve.auth.keys import KeyStore
from medserve.config import ModelSpec, Settings
from medserve.engines.llamacpp import LlamaCppSpec
from medserve.engines.supervisor import DEFAULT_STATE_DIR, VLLM_MODULE, read_status, tail
from medserve.engines.vllm import VllmSpec
from medserve.errors import ConfigError
from medserve.manifest import ManifestError, check_file, check_tree, sha256_file
from medserve.privacy import OFFLINE_ENV

Level = Literal["ok", "warn", "danger"]


@dataclass(frozen=True)
class Check:
    name: str
    level: Level
    detail: str


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def checks(
    settings: Settings, models: list[ModelSpec], hash_models: bool = True
) -> Iterator[Check]:
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
    allowed = ", ".join(settings.egress_allow) or "loopback only"
    yield Check("egress guard", "ok", f"on at start-up; allowed: {allowed}")
    differing = sorted(k for k, v in OFFLINE_ENV.items() if os.environ.get(k) not in (None, v))
    yield Check(
        "offline env",
        "ok",
        "forced at start-up: "
        + " ".join(f"{k}={v}" for k, v in OFFLINE_ENV.items())
        + (f" (overriding {', '.join(differing)})" if differing else ""),
    )
    yield from _audit(settings)
    for spec in models:
        yield from _models(spec, hash_models)


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


def _audit(settings: Settings) -> Iterator[Check]:
    conf = settings.audit
    if not conf.enabled:
        yield Check("audit", "danger", "off: requests leave no record")
        return
    directory = conf.path.parent
    existing = next((p for p in (directory, *directory.parents) if p.exists()), None)
    writable = existing is not None and os.access(existing, os.W_OK)
    yield Check(
        "audit log",
        "ok" if writable else "danger",
        f"{conf.path} ({'writable' if writable else 'not writable'}); "
        f"on failure: {conf.on_failure}",
    )
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


def _models(spec: ModelSpec, hash_models: bool) -> Iterator[Check]:
    """One check per replica; a single-replica model keeps its plain name."""
    for i, replica in enumerate(spec.replicas):
        name = f"model {spec.id}" + (f" replica {i}" if len(spec.replicas) > 1 else "")
        if isinstance(replica, LlamaCppSpec):
            yield _weights(name, spec.id, replica, hash_models)
        elif isinstance(replica, VllmSpec):
            yield from _vllm(name, spec.id, replica, hash_models)
        else:
            yield Check(name, "warn", f"{replica.engine} engine (tests and demos only)")


def _vllm(name: str, model: str, spec: VllmSpec, hash_models: bool) -> Iterator[Check]:
    """A remote replica: where it is. A supervised one: its interpreter, weights (against
    the manifest) and the state its supervisor last recorded, with the log's tail when
    that run never became ready (it never saw a request, so its log holds no patient data).
    """
    launch = spec.launch
    if launch is None:
        yield Check(name, "ok", f"vLLM at {spec.url} (remote)")
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
