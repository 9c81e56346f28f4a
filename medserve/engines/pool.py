"""How medserve holds its connections to an OpenAI-compatible upstream (a vLLM server):
generation traffic split over a few httpx connection pools (:class:`Lanes`), and each
connection kept for the next request by reading a finished stream to its end
(:func:`read_to_end`). In front of a fake vLLM at 64 concurrent requests (32 tokens each,
audit on) the two took medserve's CPU per request from about 16 ms to 9 ms (py-spy had
put httpx and httpcore at half of the gateway's CPU, a third of that in the pool's walk).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import httpx

# Requests in flight per lane. httpcore's pool walks all of its connections at every
# request's start and end (and asks each idle one whether its socket is readable): with
# 64 connections in one pool that walk was a sixth of the gateway's CPU (py-spy, 64
# concurrent requests). Smaller pools keep it short.
LANE_REQUESTS = 8


class Lanes:
    """A replica's generation traffic split over ``ceil(max_outstanding / LANE_REQUESTS)``
    httpx clients (each its own connection pool, same URL, key and limits); a request
    takes the lane with the fewest requests in flight (:meth:`take`) and holds it, for its
    ``/tokenize`` and its generation, until it ends."""

    def __init__(self, clients: list[httpx.AsyncClient]) -> None:
        self._clients = clients
        self._busy = [0] * len(clients)

    @contextlib.contextmanager
    def take(self) -> Iterator[httpx.AsyncClient]:
        busy = self._busy
        lane = busy.index(min(busy))
        busy[lane] += 1
        try:
            yield self._clients[lane]
        finally:
            busy[lane] -= 1

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()


# What follows an upstream's ``[DONE]`` is normally only the end of its chunked body, sent
# with it or right after it. Read within these bounds, the connection goes back to httpx's
# pool; a response closed before its end closes its connection, and every request would
# open a new one (measured: a TCP connect and the upstream's accept per request).
AFTER_DONE_S = 0.05
AFTER_DONE_BYTES = 64 * 1024


async def read_to_end(reads: AsyncIterator[bytes]) -> None:
    """Read the rest of a response after ``[DONE]`` (AFTER_DONE_S, AFTER_DONE_BYTES at
    most), so that its connection can be reused; past either bound, or on an error, the
    response is left unfinished and its connection is closed as before."""
    size = 0
    with contextlib.suppress(TimeoutError, httpx.HTTPError):
        async with asyncio.timeout(AFTER_DONE_S):
            async for piece in reads:
                size += len(piece)
                if size > AFTER_DONE_BYTES:
                    return
