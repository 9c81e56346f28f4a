"""Stalled connections are cut, normal clients are served meanwhile, and the cap holds.

Real `medserve serve` processes on 127.0.0.1 (fake engine) with short timeouts. A socket
that the server closes reads EOF (or a reset); every wait is a socket read with a
timeout, bounded by a deadline far above the configured timeouts, so a server that never
cuts the connection fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

import httpx
import pytest

from tests.conftest import AUTH, DEV_KEY, SECRET
from tests.serverproc import Server, fake_registry, running_server
from tests.sse import DONE, events

pytestmark = pytest.mark.e2e

HEADER_S, BODY_S, KEEP_ALIVE_S = 1.5, 1.5, 1.0
CUT_WITHIN_S = 20.0  # far above every timeout: a connection still open then was never cut
MODELS = b"GET /v1/models HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer " + DEV_KEY.encode()


@contextmanager
def start(tmp_path: Path, **settings: str) -> Iterator[Server]:
    config = fake_registry(tmp_path / "fake.toml", context_length=512, fake_token_delay_s=0.05)
    env = {
        "MEDSERVE_HEADER_TIMEOUT_S": str(HEADER_S),
        "MEDSERVE_BODY_TIMEOUT_S": str(BODY_S),
        "MEDSERVE_KEEP_ALIVE_TIMEOUT_S": str(KEEP_ALIVE_S),
        **settings,
    }
    with running_server(tmp_path / "serve.log", "-c", str(config), env=env) as server:
        yield server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with start(tmp_path_factory.mktemp("conn")) as s:
        yield s


def connect(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.settimeout(0.25)
    return sock


def read_until_closed(sock: socket.socket, during: Callable[[], None] = lambda: None) -> bytes:
    """Everything the server sends until it closes; ``during`` runs between reads.

    Fails if the connection is still open after CUT_WITHIN_S.
    """
    received = b""
    deadline = time.monotonic() + CUT_WITHIN_S
    while time.monotonic() < deadline:
        during()
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"connection still open after {CUT_WITHIN_S} s")


def served(server: Server) -> None:
    """A normal client, on its own connection, gets its answer."""
    r = httpx.get(f"{server.url}/v1/models", headers=AUTH, timeout=10)
    assert r.status_code == 200


def test_a_slowloris_client_is_cut_while_a_normal_one_is_served(server: Server) -> None:
    sock = connect(server)
    sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: t\r\n")
    sent = [0]

    def trickle_and_serve() -> None:
        try:
            sock.sendall(f"X-Pad-{sent[0]}: 1\r\n".encode())  # never the final blank line
        except OSError:
            return
        sent[0] += 1
        served(server)

    with sock:
        assert read_until_closed(sock, trickle_and_serve) == b""
    assert sent[0] >= 2  # it kept sending header lines, and the deadline held anyway


def test_a_connection_that_sends_nothing_is_cut(server: Server) -> None:
    with connect(server) as sock:
        assert read_until_closed(sock, lambda: served(server)) == b""


def test_an_idle_keep_alive_connection_is_cut(server: Server) -> None:
    with connect(server) as sock:
        sock.sendall(MODELS + b"\r\n\r\n")
        received = read_until_closed(sock)
    assert received.startswith(b"HTTP/1.1 200")
    assert b"fake-echo" in received  # the answer came in full before the idle cut


def test_an_unfinished_body_gets_408_and_the_connection_is_cut(server: Server) -> None:
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + DEV_KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n"
    )
    with connect(server) as sock:
        sock.sendall(head + b'{"model": "fake-echo", "messages": [')
        received = read_until_closed(sock, lambda: served(server))
    status, _, rest = received.partition(b"\r\n")
    assert status == b"HTTP/1.1 408 Request Timeout"
    assert b"connection: close" in rest.lower()
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"]["code"] == "body_timeout"


def test_a_body_still_trickling_after_an_early_answer_is_cut(server: Server) -> None:
    # No key: answered 401 before the body is read; the rest of the body never comes.
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n"
    with connect(server) as sock:
        sock.sendall(head + b"{")

        def trickle() -> None:
            with suppress(OSError):  # closed: the next read says so
                sock.sendall(b" ")

        received = read_until_closed(sock, trickle)
    assert received.startswith(b"HTTP/1.1 401")


def test_a_stream_longer_than_every_timeout_is_not_cut(server: Server) -> None:
    words = " ".join(f"w{i}" for i in range(80))  # 80 tokens x 0.05 s: about 4 s
    body = {"model": "fake-echo", "prompt": words, "stream": True, "max_tokens": 100}
    started = time.monotonic()
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=30
    ) as r:
        got = events(r.iter_lines())
    assert time.monotonic() - started > max(HEADER_S, BODY_S, KEEP_ALIVE_S)
    assert got[-1] == DONE
    chunks = got[:-1]
    text = "".join(c["text"] for chunk in chunks for c in chunk.get("choices", []))
    assert text.split() == words.split()


def roundtrip(sock: socket.socket, request: bytes) -> bytes:
    """Send ``request`` and read one whole response (head and Content-Length body)."""
    sock.sendall(request)
    received = b""
    deadline = time.monotonic() + CUT_WITHIN_S
    while time.monotonic() < deadline:
        head, sep, body = received.partition(b"\r\n\r\n")
        if sep:
            length = next(
                int(line.split(b":")[1])
                for line in head.lower().split(b"\r\n")
                if line.startswith(b"content-length:")
            )
            if len(body) >= length:
                return received
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        assert chunk, f"closed mid-response: {received!r}"
        received += chunk
    raise AssertionError("no complete response in time")


def test_beyond_the_cap_new_connections_get_503_while_open_ones_are_served(
    tmp_path: Path,
) -> None:
    cap = 3
    settings = {
        "MEDSERVE_MAX_CONNECTIONS": str(cap),
        "MEDSERVE_HEADER_TIMEOUT_S": "60",
        "MEDSERVE_KEEP_ALIVE_TIMEOUT_S": "60",
    }
    with start(tmp_path, **settings) as server, ExitStack() as stack:
        held = [stack.enter_context(connect(server)) for _ in range(cap)]
        for sock in held:  # each open connection is served, and stays open
            assert roundtrip(sock, MODELS + b"\r\n\r\n").startswith(b"HTTP/1.1 200")
        with connect(server) as extra:
            extra.sendall(MODELS + b"\r\n\r\n")
            refused = read_until_closed(extra)
        status, _, rest = refused.partition(b"\r\n")
        assert status == b"HTTP/1.1 503 Service Unavailable"
        assert b"retry-after: 1" in rest.lower()
        assert_medserve_headers(rest)
        assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"]["code"] == "overloaded"
        # The open connections are still served as usual.
        for sock in held:
            assert roundtrip(sock, MODELS + b"\r\n\r\n").startswith(b"HTTP/1.1 200")
        held[0].close()
        # One closed: a new connection is served again (the server notices the close
        # asynchronously: a bounded number of tries).
        answers = []
        for _ in range(50):
            with connect(server) as sock:
                sock.sendall(MODELS + b"\r\nConnection: close\r\n\r\n")
                answers.append(read_until_closed(sock)[:12])
            if answers[-1] == b"HTTP/1.1 200":
                break
        assert answers[-1] == b"HTTP/1.1 200", answers


def assert_medserve_headers(head: bytes) -> None:
    """The headers README promises on every response, in a raw response head."""
    lines = head.partition(b"\r\n\r\n")[0].lower().split(b"\r\n")
    names = {line.partition(b":")[0] for line in lines}
    assert {b"x-request-id", b"cache-control", b"x-content-type-options", b"referrer-policy"} <= (
        names
    ), names
    assert b"cache-control: no-store" in lines


MALFORMED = {
    "garbage request line": b"GARBAGE\r\n\r\n",
    "NUL in a header value": b"GET /v1/models HTTP/1.1\r\nHost: t\r\nX-A: a\x00b\r\n\r\n",
    "two Content-Length headers": (
        b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n"
        b"Content-Length: 3\r\n\r\n{}"
    ),
    "negative Content-Length": (
        b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: -5\r\n\r\n"
    ),
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_request_the_parser_refuses_gets_the_envelope_and_headers(
    server: Server, raw: bytes
) -> None:
    with connect(server) as sock:
        sock.sendall(raw)
        answer = read_until_closed(sock)
    status, _, rest = answer.partition(b"\r\n")
    assert status == b"HTTP/1.1 400 Bad Request"
    assert_medserve_headers(rest)
    error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert error["type"] == "invalid_request_error"
    served(server)


def test_forwarded_for_is_ignored_unless_the_proxy_is_trusted(tmp_path: Path) -> None:
    spoofed = {"X-Forwarded-For": SECRET, **AUTH}
    db = tmp_path / "a" / "audit" / "audit.db"
    (tmp_path / "a").mkdir()
    with start(tmp_path / "a") as server:
        assert httpx.get(f"{server.url}/v1/models", headers=spoofed).status_code == 200
        forged = {"X-Forwarded-For": "10.9.8.7", **AUTH}
        assert httpx.get(f"{server.url}/v1/models", headers=forged).status_code == 200
    assert [r["client"] for r in requests(db)][-2:] == ["127.0.0.1", "127.0.0.1"]

    trusted = {"MEDSERVE_TRUSTED_PROXIES": '["127.0.0.1"]'}
    db = tmp_path / "b" / "audit" / "audit.db"
    (tmp_path / "b").mkdir()
    with start(tmp_path / "b", **trusted) as server:
        assert httpx.get(f"{server.url}/v1/models", headers=spoofed).status_code == 200
        forwarded = {"X-Forwarded-For": "10.9.8.7", **AUTH}
        assert httpx.get(f"{server.url}/v1/models", headers=forwarded).status_code == 200
    assert [r["client"] for r in requests(db)][-2:] == ["invalid", "10.9.8.7"]
    assert SECRET not in (tmp_path / "b" / "serve.log").read_text()


def requests(db: Path) -> list[dict[str, object]]:
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT body FROM records WHERE kind = 'request' ORDER BY seq")
    found = [json.loads(body) for (body,) in rows.fetchall()]
    conn.close()
    return found
