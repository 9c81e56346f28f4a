"""The sockets under the vLLM relay's httpx clients: httpcore's pool on plain asyncio.

httpx reads a response through httpcore, and httpcore, on asyncio, through anyio's socket
stream, which turns reading on before every read and off after it (two ``epoll_ctl``
calls and the selector's bookkeeping per read) and wraps each read in a cancel scope. A
vLLM stream is one small read per token: py-spy put those reads at about 12% of
medserve's CPU relaying tokens to 64 clients, two thirds of it in turning reading on.

:class:`AsyncioBackend` is an httpcore network backend (httpcore's own extension point)
whose connections read with an :class:`asyncio.Protocol`: reading stays on, bytes wait in
a buffer (reading pauses only past BUFFER_HIGH unread bytes), a read takes what is there
or waits for the next ``data_received``. :class:`PooledTransport` is an httpx transport
over ``httpcore.AsyncConnectionPool`` with that backend; httpx above it (requests,
responses, timeouts, errors) is unchanged. Connections go through ``loop.create_connection``
and so through ``socket.connect``: the egress guard sees them as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any

import httpcore
import httpx

# httpcore's type of a socket option (setsockopt's arguments).
SocketOption = (
    tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]
)
BUFFER_HIGH = 256 * 1024  # unread bytes at which a connection stops reading
BUFFER_LOW = 64 * 1024  # and starts again


class _Reader(asyncio.Protocol):
    """A connection's bytes as they arrive, and its state, for :class:`_Stream`."""

    def __init__(self) -> None:
        self.chunks: deque[bytes] = deque()
        self.size = 0
        self.ended = False  # EOF or connection lost
        self.error: Exception | None = None
        self.transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
        if self.size > BUFFER_HIGH and self.transport is not None and not self._paused:
            self.transport.pause_reading()
            self._paused = True
        self._wake()

    def eof_received(self) -> bool:
        self.ended = True
        self._wake()
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self.error = exc
        self._wake()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        if self._drained is None or self._drained.done():
            self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait_data(self) -> None:
        """Until there are bytes to read or the connection ended."""
        while not self.chunks and not self.ended:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    def take(self, max_bytes: int) -> bytes:
        chunk = self.chunks.popleft()
        if len(chunk) > max_bytes:
            chunk, rest = chunk[:max_bytes], chunk[max_bytes:]
            self.chunks.appendleft(rest)
        self.size -= len(chunk)
        if self._paused and self.size < BUFFER_LOW and self.transport is not None:
            self.transport.resume_reading()
            self._paused = False
        return chunk

    @property
    def writing_paused(self) -> bool:
        return self._drained is not None and not self._drained.done()

    async def drain(self) -> None:
        """Until the transport takes more bytes (or the connection ended)."""
        if self._drained is not None and not self._drained.done():
            await self._drained


@contextlib.contextmanager
def _raising(timeout_as: type[Exception], error_as: type[Exception]) -> Iterator[None]:
    """httpcore's exceptions for a timeout and an OS or TLS error (with the type's name
    only: never a peer's bytes)."""
    try:
        yield
    except TimeoutError:
        raise timeout_as("timed out") from None
    except (OSError, ssl.SSLError) as exc:
        raise error_as(type(exc).__name__) from None


class _Stream(httpcore.AsyncNetworkStream):
    def __init__(self, transport: asyncio.Transport, reader: _Reader) -> None:
        self._transport = transport
        self._reader = reader

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        reader = self._reader
        if not reader.chunks and not reader.ended:
            with _raising(httpcore.ReadTimeout, httpcore.ReadError):
                if timeout is None:
                    await reader.wait_data()
                else:
                    async with asyncio.timeout(timeout):
                        await reader.wait_data()
        if reader.chunks:
            return reader.take(max_bytes)
        if reader.error is not None:
            raise httpcore.ReadError(type(reader.error).__name__)
        return b""  # end of stream

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        if self._reader.ended or self._transport.is_closing():
            raise httpcore.WriteError("connection closed")
        self._transport.write(buffer)
        if self._reader.writing_paused:
            with _raising(httpcore.WriteTimeout, httpcore.WriteError):
                async with asyncio.timeout(timeout):
                    await self._reader.drain()

    async def aclose(self) -> None:
        self._transport.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            with _raising(httpcore.ConnectTimeout, httpcore.ConnectError):
                async with asyncio.timeout(timeout):
                    tls = await loop.start_tls(
                        self._transport,
                        self._reader,
                        ssl_context,
                        server_hostname=server_hostname,
                    )
        except BaseException:
            self._transport.close()
            raise
        assert isinstance(tls, asyncio.Transport)
        self._reader.transport = tls
        return _Stream(tls, self._reader)

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":  # an idle connection the server closed (or wrote to)
            return bool(self._reader.chunks) or self._reader.ended
        name = {
            "ssl_object": "ssl_object",
            "client_addr": "sockname",
            "server_addr": "peername",
            "socket": "socket",
        }.get(info)
        return None if name is None else self._transport.get_extra_info(name)


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend on asyncio protocols (see the module docstring)."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        local = (local_address, 0) if local_address else None
        with _raising(httpcore.ConnectTimeout, httpcore.ConnectError):
            async with asyncio.timeout(timeout):
                transport, reader = await loop.create_connection(
                    _Reader, host, port, local_addr=local
                )
        sock: socket.socket = transport.get_extra_info("socket")
        for option in socket_options or ():
            sock.setsockopt(*option)  # asyncio sets TCP_NODELAY itself
        return _Stream(transport, reader)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        with _raising(httpcore.ConnectTimeout, httpcore.ConnectError):
            async with asyncio.timeout(timeout):
                transport, reader = await loop.create_unix_connection(_Reader, path)
        return _Stream(transport, reader)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


# httpcore's errors, each raised to httpx's caller as httpx's error of the same name.
CORE_ERRORS = (
    httpcore.TimeoutException,
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.ProxyError,
    httpcore.UnsupportedProtocol,
)


def _httpx_error(exc: Exception, request: httpx.Request) -> httpx.TransportError:
    """The httpx exception of the same name as httpcore's ``exc`` (httpx names its
    transport errors as httpcore does), else its nearest base's."""
    for kind in type(exc).__mro__:
        found = getattr(httpx, kind.__name__, None)
        if isinstance(found, type) and issubclass(found, httpx.TransportError):
            return found(str(exc), request=request)
    return httpx.TransportError(str(exc), request=request)


class _Body(httpx.AsyncByteStream):
    def __init__(self, stream: AsyncIterable[bytes], request: httpx.Request) -> None:
        self._stream = stream
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for piece in self._stream:
                yield piece
        except CORE_ERRORS as exc:
            raise _httpx_error(exc, self._request) from None

    async def aclose(self) -> None:
        close = getattr(self._stream, "aclose", None)
        if close is not None:
            await close()


class PooledTransport(httpx.AsyncBaseTransport):
    """An httpx transport: one ``httpcore.AsyncConnectionPool`` on :class:`AsyncioBackend`,
    HTTP/1.1, ``verify`` the TLS context of https URLs."""

    def __init__(self, verify: ssl.SSLContext, limits: httpx.Limits) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=verify,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=AsyncioBackend(),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        core = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        try:
            response = await self._pool.handle_async_request(core)
        except CORE_ERRORS as exc:
            raise _httpx_error(exc, request) from None
        assert isinstance(response.stream, AsyncIterable)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_Body(response.stream, request),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()
