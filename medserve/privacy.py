"""Offline posture: the environment that keeps every ML library from calling home, and the
egress guard that refuses any connection that is not local.

medserve never downloads anything at run time. The offline variables make sure the
libraries it loads (and any engine process it starts) do not either: no model hub, no
dataset hub, no usage statistics, no telemetry. The egress guard is the second line: a
``sys.addaudithook`` hook that refuses, before any packet is sent, every connect, name
lookup or datagram to an address that is not loopback or a configured upstream (a vLLM
replica), whichever library tries it, and reports each refusal.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any

log = logging.getLogger(__name__)

OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_HOST_IP": "127.0.0.1",
}


def apply_offline_env(environ: MutableMapping[str, str]) -> dict[str, str]:
    """Force the offline variables into ``environ``; return the ones that had other values.

    Forced, not defaulted: an operator's ``HF_HUB_OFFLINE=0`` must not open a path to the
    internet from a server that holds patient data.
    """
    changed = {k: environ[k] for k, v in OFFLINE_ENV.items() if k in environ and environ[k] != v}
    environ.update(OFFLINE_ENV)
    return changed


class EgressRefused(PermissionError):
    """A connection to a non-local address was refused by the egress guard."""


# Audit events that can send a packet or ask a resolver; address position in their args.
GUARDED = {
    "socket.connect": 1,
    "socket.sendto": 1,
    "socket.getaddrinfo": 0,
    "socket.gethostbyname": 0,
    "socket.gethostbyaddr": 0,
}
LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def resolve(name: str) -> set[str]:
    """The addresses ``name`` resolves to now (empty when it does not resolve)."""
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(name, None)}
    except OSError:
        log.warning("an allowed upstream name does not resolve", extra={"host": name[:255]})
        return set()


class EgressGuard:
    """Refuses non-local destinations. Installed once per process (audit hooks cannot be
    removed); :meth:`disable` turns it into a no-op, for tests.

    A connect names an address, not a host name, so :meth:`install` resolves the allowed
    names (with ``resolver``, default :func:`resolve`) and allows their addresses as of
    then; a name whose addresses change later needs a restart.
    """

    def __init__(
        self,
        allowed: Iterable[str] = (),
        on_refusal: Callable[[str], object] | None = None,
        resolver: Callable[[str], Iterable[str]] = resolve,
    ) -> None:
        self.allowed = frozenset(a.lower() for a in allowed)
        self.on_refusal = on_refusal
        self.refusals = 0
        self.active = False
        self._resolver = resolver

    def install(self) -> None:
        if not self.active:
            names = [a for a in self.allowed if not _is_address(a)]
            addresses = {a.lower() for name in names for a in self._resolver(name)}
            self.allowed = self.allowed | addresses
            self.active = True
            sys.addaudithook(self._hook)

    def disable(self) -> None:
        self.active = False

    def allows(self, host: object) -> bool:
        """Loopback addresses and names, unix sockets, and the configured upstreams."""
        if host is None:
            return True  # getaddrinfo(None, ...): the local wildcard
        if isinstance(host, (bytes, bytearray)):
            host = bytes(host).decode("ascii", "replace")
        if not isinstance(host, str):
            return False
        name = host.strip("[]").lower()
        if name in LOCAL_NAMES or name in self.allowed or name == "":
            return True
        try:
            return ipaddress.ip_address(name.split("%")[0]).is_loopback
        except ValueError:
            return False  # any other name would need a resolver: refused

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        index = GUARDED.get(event)
        if index is None or not self.active:
            return
        target = args[index] if len(args) > index else None
        if event in ("socket.connect", "socket.sendto"):
            if isinstance(target, (str, bytes, bytearray)):
                return  # an AF_UNIX path
            target = target[0] if isinstance(target, tuple) and target else target
        if self.allows(target):
            return
        self.refusals += 1
        log.warning("egress refused", extra={"event": event, "host": str(target)[:255]})
        if self.on_refusal is not None:
            self.on_refusal(str(target)[:255])
        raise EgressRefused(f"medserve's egress guard refused a connection ({event})")


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return False
    return True
