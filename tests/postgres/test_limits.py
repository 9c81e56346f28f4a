"""Rate limits shared through PostgreSQL (medserve.auth.pglimits): two limiters on one
database stand for two gateways (the process-level test is tests/postgres/test_gateways.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from medserve.auth.keys import Key
from medserve.auth.pgkeys import PgKeyStore
from medserve.auth.pglimits import SharedRateLimiter
from medserve.errors import RateLimitError, UnavailableError
from tests import pg

pytestmark = pytest.mark.anyio
pytest.importorskip("psycopg", reason="the postgres extra (psycopg) is not installed")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def url(pg_db: pg.PgDatabase) -> str:
    PgKeyStore(pg_db.owner_url).all()  # the schema, as a gateway's start makes it
    return pg_db.owner_url


@pytest.fixture
async def two(url: str) -> AsyncIterator[tuple[SharedRateLimiter, SharedRateLimiter]]:
    a, b = SharedRateLimiter(url), SharedRateLimiter(url)
    await a.open()
    await b.open()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


def limited(url: str, **limits: int) -> Key:
    key, _ = PgKeyStore(url).create("ward-app", **limits)  # type: ignore[arg-type]
    return key


async def admitted(admit: Callable[[], object], tries: int) -> tuple[int, list[int]]:
    """How many of ``tries`` concurrent admissions pass, and the refusals' Retry-After."""

    async def one() -> int | None:
        try:
            await admit()  # type: ignore[misc]
        except RateLimitError as exc:
            return exc.retry_after or 0
        return None

    results = await asyncio.gather(*(one() for _ in range(tries)))
    return sum(r is None for r in results), [r for r in results if r is not None]


@pytest.mark.parametrize("rpm", [1, 10, 50])
async def test_two_gateways_admit_rpm_together_not_twice_it(
    url: str, two: tuple[SharedRateLimiter, SharedRateLimiter], rpm: int
) -> None:
    key = limited(url, rpm=rpm)
    a, b = two
    turn = iter(range(10**6))

    def spread() -> object:
        return (a if next(turn) % 2 else b).admit(key)

    passed, waits = await admitted(spread, 3 * rpm)
    # Exact but for the refill while the test runs: rpm/60 per second, under one request
    # unless the admissions took longer than 60/rpm seconds.
    assert rpm <= passed <= rpm + 1
    assert waits and all(w >= 1 for w in waits)


async def test_tokens_charged_on_one_gateway_limit_the_other(
    url: str, two: tuple[SharedRateLimiter, SharedRateLimiter]
) -> None:
    key = limited(url, tpm=100)
    a, b = two
    await a.admit(key)
    a.charge(key, 150)  # a long answer overdraws the bucket, as on one gateway
    await a.flush()
    with pytest.raises(RateLimitError, match="tokens per minute") as refused:
        await b.admit(key)
    assert refused.value.retry_after is not None and refused.value.retry_after >= 30


async def test_revoking_a_key_removes_its_buckets(
    url: str, two: tuple[SharedRateLimiter, SharedRateLimiter]
) -> None:
    import psycopg

    key = limited(url, rpm=10)
    await two[0].admit(key)
    sql = "SELECT count(*) FROM auth_rate WHERE key_id = %s"
    with psycopg.connect(url) as conn:
        assert conn.execute(sql, (key.id,)).fetchone() == (1,)
        PgKeyStore(url).revoke(key.id)
        assert conn.execute(sql, (key.id,)).fetchone() == (0,)


async def test_a_key_without_limits_never_reaches_the_database(url: str) -> None:
    unopened = SharedRateLimiter(url)  # no pool at all: any query would fail
    await unopened.admit(limited(url))
    unopened.charge(limited(url), 1000)
    await unopened.flush()


async def test_an_unreachable_database_refuses_limited_keys_with_503(pg_db: pg.PgDatabase) -> None:
    url = pg_db.owner_url
    key = limited(url, rpm=100)
    wrong = url.replace(pg_db.server.passwords[pg.OWNER], "not-the-password")
    limiter = SharedRateLimiter(wrong)
    await limiter.open()
    try:
        with pytest.raises(UnavailableError) as refused:
            await limiter.admit(key)
    finally:
        await limiter.close()
    assert refused.value.status == 503 and refused.value.code == "rate_limit_unavailable"
    assert "not-the-password" not in str(refused.value)


async def test_the_gateway_role_can_admit_and_charge(pg_db: pg.PgDatabase) -> None:
    key = limited(pg_db.owner_url, rpm=2, tpm=10)  # the owner migrated and granted
    limiter = SharedRateLimiter(pg_db.gateway_url)
    await limiter.open()
    try:
        await limiter.admit(key)
        limiter.charge(key, 20)
        await limiter.flush()
        with pytest.raises(RateLimitError, match="tokens per minute"):
            await limiter.admit(key)
    finally:
        await limiter.close()
