"""The egress guard refuses non-local destinations before anything is sent."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from medserve.api.app import create_app
from medserve.cli import server_options
from medserve.config import Settings
from medserve.engines.netio import PooledTransport
from medserve.privacy import EgressGuard, EgressRefused
from medserve.router import Router
from tests.conftest import fake_spec

# TEST-NET-1 (RFC 5737): documentation addresses, never routed. The guard refuses before
# any packet could be sent, so nothing is ever contacted.
NEVER = "192.0.2.1"


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        (None, True),
        ("gpu-node-1", True),  # configured upstream
        ("GPU-NODE-1", True),
        (NEVER, False),
        ("10.0.0.5", False),
        ("0.0.0.0", False),
        ("huggingface.co", False),
        (b"huggingface.co", False),
        ("localhost.evil.example", False),
        (("tuple",), False),
    ],
)
def test_allows(host: object, allowed: bool) -> None:
    assert EgressGuard(["gpu-node-1"]).allows(host) is allowed


def test_an_allowed_name_allows_its_addresses_once_installed() -> None:
    g = EgressGuard(["gpu-node-1", "10.9.9.9"], resolver={"gpu-node-1": ["10.0.0.5"]}.__getitem__)
    assert not g.allows("10.0.0.5")  # a connect names the address, not the host name
    g.install()
    try:
        assert g.allows("10.0.0.5") and g.allows("10.9.9.9") and not g.allows("10.0.0.6")
    finally:
        g.disable()


@pytest.fixture
def guard() -> Iterator[EgressGuard]:
    refused: list[str] = []
    g = EgressGuard(on_refusal=refused.append)
    g.install()
    try:
        yield g
    finally:
        g.disable()  # audit hooks stay for the process; a disabled guard does nothing


def test_a_connect_to_a_remote_address_is_refused_in_process(guard: EgressGuard) -> None:
    with socket.socket() as s, pytest.raises(EgressRefused):
        s.connect((NEVER, 9))
    with pytest.raises(EgressRefused):
        socket.getaddrinfo("huggingface.co", 443)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, pytest.raises(EgressRefused):
        s.sendto(b"x", (NEVER, 53))
    assert guard.refusals == 3


def test_the_relay_transport_connects_through_the_guard(guard: EgressGuard) -> None:
    # The vLLM relay's own transport (asyncio protocols, not anyio) still calls
    # socket.connect, where the guard refuses before a packet is sent.
    async def ask() -> None:
        transport = PooledTransport(httpx.create_ssl_context(), httpx.Limits())
        async with httpx.AsyncClient(transport=transport) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get(f"http://{NEVER}:9/")

    asyncio.run(ask())
    assert guard.refusals == 1


def test_the_server_runs_on_asyncio_never_uvloop() -> None:
    # uvicorn picks uvloop wherever it is installed; uvloop's connects and name lookups
    # raise no audit event, and the guard would see none of them.
    assert server_options(Settings())["loop"] == "asyncio"


def test_loopback_still_connects(guard: EgressGuard) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname(), timeout=5):
            pass
    assert guard.refusals == 0


def test_a_refusal_reaches_the_metrics_and_the_audit_log(audit_path: Path) -> None:
    g = EgressGuard()
    app = create_app(Settings(), Router.from_specs([fake_spec()]), guard=g)
    with TestClient(app) as client:
        assert g.on_refusal is not None
        g.on_refusal(NEVER)
        page = client.get("/metrics").text
    assert "medserve_egress_refusals_total 1.0" in page
    conn = sqlite3.connect(audit_path)
    bodies = [json.loads(b) for (b,) in conn.execute("SELECT body FROM records")]
    conn.close()
    (event,) = [b for b in bodies if b.get("event") == "egress.refused"]
    assert event["details"] == {"host": NEVER}
