"""The load generator against the fake engine (in-process ASGI transport)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from medserve import bench
from medserve.api.app import create_app
from medserve.config import Settings
from medserve.engines.fake import FakeEngine
from medserve.router import Router, Served
from tests.conftest import DEV_KEY, fake_spec

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize("stream", [False, True])
async def test_counts_requests_tokens_and_errors(stream: bool) -> None:
    spec = fake_spec(context_length=512)
    router = Router([Served(spec, (FakeEngine(spec),))])
    app = create_app(Settings(), router)
    await router.start()
    try:
        seen: list[bench.Sample] = []
        report = await bench.run(
            "http://medserve.test",
            "fake-echo",
            concurrency=3,
            requests=7,
            max_tokens=4,
            prompts=["one two three four five six"],
            stream=stream,
            on_done=seen.append,
            transport=httpx.ASGITransport(app=app),
            api_key=DEV_KEY,
        )
        assert (report.requests, report.completed, report.errors) == (7, 7, {})
        assert len(seen) == 7
        # The fake echoes "user: one two ...": max_tokens=4 tokens per request.
        assert report.output_tokens == 28
        assert set(report.latency_s) == {"p50", "p90", "p99"}
        assert bool(report.ttft_s) is stream
        missing = await bench.run(
            "http://medserve.test",
            "no-such-model",
            concurrency=2,
            requests=3,
            max_tokens=4,
            prompts=["x"],
            stream=stream,
            transport=httpx.ASGITransport(app=app),
            api_key=DEV_KEY,
        )
        assert (missing.completed, missing.errors) == (0, {"http_404": 3})
    finally:
        await router.close()


def test_prompt_files(tmp_path: Path) -> None:
    lines = tmp_path / "p.txt"
    lines.write_text("first\n\nsecond\n")
    assert bench.load_prompts(lines) == ["first", "second"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a"}\n{"prompt": "b", "id": 2}\n')
    assert bench.load_prompts(jsonl) == ["a", "b"]
    assert bench.load_prompts(None) == list(bench.DEFAULT_PROMPTS)


def test_percentiles() -> None:
    assert bench.percentiles([]) == {}
    assert bench.percentiles([2.0]) == {"p50": 2.0, "p90": 2.0, "p99": 2.0}
    p = bench.percentiles([float(i) for i in range(1, 101)])
    assert p["p50"] == pytest.approx(50.5) and p["p99"] == pytest.approx(99.01)


@pytest.mark.parametrize(
    ("system", "roles"),
    [(None, [("user", "q1")]), ("shared rules", [("system", "shared rules"), ("user", "q1")])],
)
async def test_system_message_goes_before_every_prompt(
    system: str | None, roles: list[tuple[str, str]]
) -> None:
    spec = fake_spec(context_length=512)
    engine = FakeEngine(spec)
    router = Router([Served(spec, (engine,))])
    app = create_app(Settings(), router)
    await router.start()
    try:
        report = await bench.run(
            "http://medserve.test",
            "fake-echo",
            concurrency=1,
            requests=2,
            max_tokens=2,
            prompts=["q1"],
            stream=True,
            system=system,
            transport=httpx.ASGITransport(app=app),
            api_key=DEV_KEY,
        )
        assert report.completed == 2
        for request in engine.requests:
            assert request.messages is not None
            assert [(m.role, m.content) for m in request.messages] == roles
    finally:
        await router.close()
