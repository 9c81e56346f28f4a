"""The systemd units in deploy/systemd: offline, loopback-only, hardened, and naming real
settings at paths the unit lets medserve write.

`scripts/check-units.sh` (run by `make deploy-check`) has systemd itself verify and score
the units; this test holds what systemd cannot know: medserve's own names and lists
(``medserve.privacy.OFFLINE_ENV``, the settings in ``medserve/config.py``) and where the
unit's writable directories are.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import pytest
from pydantic import BaseModel

from medserve.config import Settings, load_settings
from medserve.privacy import OFFLINE_ENV

UNITS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
GATEWAY = "medserve.service"
VLLM = "medserve-vllm@.service"
UNITS = (GATEWAY, VLLM)

Entries = list[tuple[str, str, str]]


def parse_unit(text: str) -> Entries:
    """(section, key, value) per assignment, in order; continuation lines (a trailing
    backslash) joined with a space, as systemd does; comments and blank lines dropped."""
    entries: Entries = []
    section = ""
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def service(unit: str) -> Entries:
    return [e for e in parse_unit((UNITS_DIR / unit).read_text()) if e[0] == "Service"]


def values(unit: str, key: str) -> list[str]:
    """Every value assigned to ``key`` in [Service], in order."""
    return [value for _, k, value in service(unit) if k == key]


def last(unit: str, key: str) -> str | None:
    """The value in effect for a single-valued setting: the last assignment."""
    found = values(unit, key)
    return found[-1] if found else None


def environment(unit: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for assignment in values(unit, "Environment"):
        name, _, value = assignment.partition("=")
        env[name] = value
    return env


def directories(unit: str, key: str, root: str) -> list[PurePosixPath]:
    """The absolute paths of StateDirectory=/CacheDirectory=/RuntimeDirectory= entries."""
    return [PurePosixPath(root) / name for v in values(unit, key) for name in v.split()]


def test_every_unit_is_covered() -> None:
    """A unit added to deploy/systemd must get rows in these tables."""
    assert sorted(p.name for p in UNITS_DIR.iterdir() if p.suffix == ".service") == sorted(UNITS)


@pytest.mark.parametrize("unit", UNITS)
@pytest.mark.parametrize("name", sorted(OFFLINE_ENV))
def test_offline_variables(unit: str, name: str) -> None:
    assert environment(unit).get(name) == OFFLINE_ENV[name], f"{unit}: {name}"


# (unit, setting, value in effect): the hardening each unit must keep. systemd-analyze's
# score (check-units.sh) catches a weakening too, but not which directive, and not those
# that matter more here than in its weights (W+X memory, devices, loopback).
COMMON = {
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateUsers": "yes",
    "PrivateMounts": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectProc": "invisible",
    "RestrictNamespaces": "yes",
    "RestrictSUIDSGID": "yes",
    "RestrictRealtime": "yes",
    "LockPersonality": "yes",
    "SystemCallArchitectures": "native",
    "SystemCallErrorNumber": "EPERM",
    "UMask": "0077",
    "IPAddressDeny": "any",
    "IPAddressAllow": "localhost",
}
HARDENING = [
    *((unit, key, value) for unit in UNITS for key, value in COMMON.items()),
    (GATEWAY, "MemoryDenyWriteExecute", "yes"),
    (GATEWAY, "PrivateDevices", "yes"),
    (GATEWAY, "ProcSubset", "pid"),
    (GATEWAY, "RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
    (VLLM, "PrivateDevices", "no"),
    (VLLM, "DevicePolicy", "closed"),
    (VLLM, "KillMode", "control-group"),
    (VLLM, "RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX AF_NETLINK"),
]


@pytest.mark.parametrize(("unit", "key", "expected"), HARDENING)
def test_hardening(unit: str, key: str, expected: str) -> None:
    assert last(unit, key) == expected


@pytest.mark.parametrize("unit", UNITS)
def test_syscall_filter_and_user(unit: str) -> None:
    filters = values(unit, "SystemCallFilter")
    assert filters[:1] == ["@system-service"], "an allow list first"
    assert any(f.startswith("~") and "@privileged" in f[1:].split() for f in filters)
    user = last(unit, "User")
    assert user and user not in ("root", "0")
    assert not values(unit, "DynamicUser")


def test_vllm_device_allow_only_nvidia() -> None:
    allowed = [v.split()[0] for v in values(VLLM, "DeviceAllow")]
    assert allowed and all(a.startswith(("char-nvidia", "/dev/nvidia")) for a in allowed)


# (unit, how it binds to loopback only)
LOOPBACK: list[tuple[str, Callable[[], bool]]] = [
    (GATEWAY, lambda: environment(GATEWAY).get("MEDSERVE_HOST") == "127.0.0.1"),
    (VLLM, lambda: "--host 127.0.0.1 " in (last(VLLM, "ExecStart") or "")),
]


@pytest.mark.parametrize(("unit", "check"), LOOPBACK)
def test_binds_loopback(unit: str, check: Callable[[], bool]) -> None:
    assert check(), unit


def test_vllm_never_logs_requests() -> None:
    """vLLM's request log holds prompts; medserve's supervisor turns it off, so does this."""
    assert "--no-enable-log-requests" in (last(VLLM, "ExecStart") or "").split()


def setting(name: str) -> bool:
    """Whether MEDSERVE_NAME (``__`` for nesting) names a field of :class:`Settings`."""
    model: type[BaseModel] = Settings
    parts = name.removeprefix("MEDSERVE_").lower().split("__")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        annotation = field.annotation
        if i < len(parts) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                return False
            model = annotation
    return True


def test_gateway_names_real_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every MEDSERVE_ variable is a setting, and together they load."""
    env = {k: v for k, v in environment(GATEWAY).items() if k.startswith("MEDSERVE_")}
    assert env and all(setting(name) for name in env), sorted(n for n in env if not setting(n))
    for name in [n for n in os.environ if n.startswith("MEDSERVE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert str(settings.host) == "127.0.0.1"
    assert settings.audit.enabled and settings.auth.enabled


# (MEDSERVE_ variable, where it must be): "state" = a StateDirectory= of the unit (systemd
# creates it, owned by medserve; medserve does not create these parents: the audit store
# appends checkpoints to a file whose directory must exist), "under-state" = inside one
# (medserve makes the rest), "read-only" = under ReadOnlyPaths= (root's, medserve reads).
PLACES = [
    ("MEDSERVE_AUDIT__PATH", "state"),
    ("MEDSERVE_AUTH__KEYS_PATH", "state"),
    ("MEDSERVE_AUDIT__CHECKPOINT_FILE", "state"),
    ("MEDSERVE_STATE_DIR", "under-state"),
    ("MEDSERVE_AUDIT__KEY_FILE", "read-only"),
    ("MEDSERVE_AUDIT__SIGNING_KEY_FILE", "read-only"),
    ("MEDSERVE_MODELS_DIR", "read-only"),
]


@pytest.mark.parametrize(("name", "place"), PLACES)
def test_gateway_paths(name: str, place: str) -> None:
    path = PurePosixPath(environment(GATEWAY)[name])
    state = directories(GATEWAY, "StateDirectory", "/var/lib")
    read_only = [PurePosixPath(p) for v in values(GATEWAY, "ReadOnlyPaths") for p in v.split()]
    if place == "state":
        assert path.parent in state, f"{name}={path}: its directory is no StateDirectory"
    elif place == "under-state":
        assert any(path.is_relative_to(d) for d in state), f"{name}={path}"
    else:
        assert any(path.is_relative_to(d) for d in read_only), f"{name}={path}"
        assert not any(path.is_relative_to(d) for d in state)


def test_gateway_working_directory_is_its_state() -> None:
    """Relative defaults (var/...) land in the state directory, not in / (read-only)."""
    assert PurePosixPath(last(GATEWAY, "WorkingDirectory") or "/") in directories(
        GATEWAY, "StateDirectory", "/var/lib"
    )


def test_vllm_writes_only_its_own_directories() -> None:
    """Every path vLLM is told to write (HOME, caches, IPC sockets) is one of the unit's
    own directories (systemd creates them for its user); nothing else is writable."""
    own = [
        *directories(VLLM, "StateDirectory", "/var/lib"),
        *directories(VLLM, "CacheDirectory", "/var/cache"),
        *directories(VLLM, "RuntimeDirectory", "/run"),
    ]
    paths = {k: PurePosixPath(v) for k, v in environment(VLLM).items() if v.startswith("/")}
    assert {"HOME", "VLLM_CACHE_ROOT", "VLLM_RPC_BASE_PATH"} <= set(paths)
    for name, path in paths.items():
        assert any(path.is_relative_to(d) for d in own), f"{name}={path}"


def test_parser_joins_continuations() -> None:
    entries = parse_unit("[Service]\n# c\nExecStart=/bin/a \\\n    --b c\nUser=x\n")
    assert entries == [("Service", "ExecStart", "/bin/a --b c"), ("Service", "User", "x")]
