"""The relay's httpx transport on asyncio protocols (medserve.engines.netio) against a raw
asyncio HTTP/1.1 server on 127.0.0.1: whole bodies past the read buffer's bound, kept
connections, a server that closes an idle one, a stalled read timing out, and httpx's
error types."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from medserve.engines.netio import BUFFER_HIGH, BUFFER_LOW, PooledTransport, _Reader

pytestmark = pytest.mark.anyio
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
WAIT_S = 30.0  # bound on each test's waits


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _head(reader: asyncio.StreamReader) -> bool:
    """Read one request head; False when the client closed the connection instead."""
    try:
        await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return False
    return True


def _answer(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


class Server:
    """A raw HTTP/1.1 server: each connection runs ``handler``; ``peers`` are the client
    ports of the connections it accepted."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.peers: list[int] = []
        self.url = ""

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.peers.append(writer.get_extra_info("peername")[1])
        try:
            await self.handler(reader, writer)
        finally:
            writer.close()


async def _serve(handler: Handler) -> AsyncIterator[Server]:
    server = Server(handler)
    listener = await asyncio.start_server(server._accept, "127.0.0.1", 0)
    server.url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    async with listener, asyncio.timeout(WAIT_S):
        yield server


def _client(server: Server, read_s: float | None = None) -> httpx.AsyncClient:
    # Kept connections never expire here: only the server's close may retire one.
    limits = httpx.Limits(max_connections=4, keepalive_expiry=3600)
    transport = PooledTransport(httpx.create_ssl_context(), limits)
    timeout = httpx.Timeout(5.0, read=read_s)
    return httpx.AsyncClient(base_url=server.url, transport=transport, timeout=timeout)


BIG = bytes(range(256)) * (4 * BUFFER_HIGH // 256)  # 4x the bound: reading pauses, resumes


async def test_a_body_past_the_buffer_bound_arrives_whole_on_one_kept_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await _head(reader):
            writer.write(_answer(BIG))
            await writer.drain()

    async for server in _serve(handler):
        async with _client(server) as client:
            for _ in range(3):
                async with client.stream("GET", "/") as r:
                    pieces = [piece async for piece in r.aiter_raw()]
                assert b"".join(pieces) == BIG
        assert len(server.peers) == 1


async def test_an_idle_connection_the_server_closed_is_not_reused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await _head(reader):
            writer.write(_answer(b"ok"))
            await writer.drain()
        # one answer per connection, then the server closes it (its keep-alive ran out)

    async for server in _serve(handler):
        async with _client(server) as client:
            assert (await client.get("/")).content == b"ok"
            while not _closed(client):  # the server's close reaches the kept connection
                await asyncio.sleep(0.01)  # (bounded by WAIT_S)
            assert (await client.get("/")).content == b"ok"
        assert len(server.peers) == 2


def _closed(client: httpx.AsyncClient) -> bool:
    """Whether the client's one kept connection saw the server's close (is_readable)."""
    pool = client._transport._pool  # type: ignore[attr-defined]
    return all(c.has_expired() for c in pool.connections)


@pytest.mark.parametrize(
    ("stage", "error"),
    [("head", httpx.ReadTimeout), ("body", httpx.ReadTimeout), ("drop", httpx.RemoteProtocolError)],
)
async def test_failures_are_httpx_errors(stage: str, error: type[Exception]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _head(reader)
        if stage == "body":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        elif stage == "drop":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            await writer.drain()
            return  # closed mid-body
        await writer.drain()
        await reader.read()  # until the client gives up

    async for server in _serve(handler):
        async with _client(server, read_s=0.2) as client:
            with pytest.raises(error):
                await client.get("/")


class Paused(asyncio.Transport):
    """A transport that only notes whether reading is paused."""

    paused = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


def test_reading_pauses_past_the_bound_and_resumes_below_the_low_mark() -> None:
    reader, transport = _Reader(), Paused()
    reader.connection_made(transport)
    reader.data_received(b"x" * BUFFER_HIGH)
    assert not transport.paused  # at the bound, not past it
    reader.data_received(b"y")
    assert transport.paused
    taken = reader.take(BUFFER_HIGH - BUFFER_LOW)  # one chunk, split at max_bytes
    assert taken == b"x" * (BUFFER_HIGH - BUFFER_LOW) and transport.paused
    reader.take(1)
    assert transport.paused and reader.size == BUFFER_LOW  # at the low mark, not below it
    reader.take(1)
    assert not transport.paused
    assert b"".join(reader.chunks) == b"x" * (BUFFER_LOW - 2) + b"y"
