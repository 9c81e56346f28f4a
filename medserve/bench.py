"""``medserve bench``: a load generator for any OpenAI-compatible chat endpoint.

It drives medserve, llama-cpp-python's server, llama.cpp's server or vLLM alike: a fixed
number of requests, at most ``concurrency`` in flight, each with a bounded timeout, and the
whole run bounded by ``time_limit_s``. With ``stream`` it measures time to first token and
inter-token latency from the SSE chunks; output tokens come from the server's usage counts
when it sends them (``stream_options.include_usage``), else one per content chunk.

Only loopback or operator-given URLs are contacted; nothing is sent anywhere else.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import statistics
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

# The project's own short clinical questions, used when no prompt file is given.
DEFAULT_PROMPTS = (
    "What are the early symptoms of type 2 diabetes?",
    "Explain how hypertension is diagnosed in adults.",
    "List common side effects of metformin.",
    "What should a patient know before an MRI scan?",
    "Describe first-line treatment for community-acquired pneumonia.",
    "How is asthma severity classified?",
    "What are the warning signs of a stroke?",
    "Summarise the causes of iron-deficiency anaemia.",
)


@dataclass
class Sample:
    """One request's outcome."""

    ok: bool
    error: str | None = None
    latency_s: float = 0.0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0


@dataclass
class Report:
    """Aggregates of a run; times in seconds."""

    url: str
    model: str
    concurrency: int
    requests: int
    completed: int
    errors: dict[str, int]
    duration_s: float
    requests_per_s: float
    output_tokens: int
    output_tokens_per_s: float
    latency_s: dict[str, float]
    ttft_s: dict[str, float]
    itl_s: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_prompts(path: Path | None) -> list[str]:
    """Prompts from a file: JSONL with a "prompt" field, or one prompt per line."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    prompts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            prompts.append(str(json.loads(line)["prompt"]))
        else:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"no prompts in {path}")
    return prompts


def percentiles(values: list[float], points: tuple[int, ...] = (50, 90, 99)) -> dict[str, float]:
    """``{"p50": ..., "p90": ..., "p99": ...}``; empty when there are no values."""
    if not values:
        return {}
    if len(values) == 1:
        return {f"p{p}": values[0] for p in points}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {f"p{p}": cuts[p - 1] for p in points}


async def _one(
    client: httpx.AsyncClient,
    model: str,
    prompt: str,
    max_tokens: int,
    stream: bool,
    extra: dict[str, Any],
    system: str | None = None,
) -> Sample:
    messages = [{"role": "user", "content": prompt}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }
    start = time.perf_counter()
    try:
        if not stream:
            r = await client.post("/v1/chat/completions", json=body)
            if r.status_code != 200:
                return Sample(ok=False, error=f"http_{r.status_code}")
            usage = r.json().get("usage") or {}
            return Sample(
                ok=True,
                latency_s=time.perf_counter() - start,
                output_tokens=int(usage.get("completion_tokens", 0)),
            )
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        stamps: list[float] = []
        usage_tokens: int | None = None
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return Sample(ok=False, error=f"http_{r.status_code}")
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    # Read on to the end of the body, as the openai SDK does: a response
                    # left unread closes its connection, and every request reconnects.
                    continue
                event = json.loads(data)
                if "error" in event:
                    return Sample(ok=False, error="stream_error")
                if event.get("usage"):
                    usage_tokens = int(event["usage"].get("completion_tokens", 0))
                for choice in event.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        stamps.append(time.perf_counter())
        end = time.perf_counter()
        return Sample(
            ok=True,
            latency_s=end - start,
            ttft_s=stamps[0] - start if stamps else None,
            itl_s=[b - a for a, b in zip(stamps, stamps[1:], strict=False)],
            output_tokens=usage_tokens if usage_tokens is not None else len(stamps),
        )
    except httpx.TimeoutException:
        return Sample(ok=False, error="timeout")
    except httpx.TransportError:
        return Sample(ok=False, error="connection")
    except (json.JSONDecodeError, ValueError, KeyError):
        return Sample(ok=False, error="bad_response")


async def run(
    url: str,
    model: str,
    *,
    concurrency: int,
    requests: int,
    max_tokens: int,
    prompts: list[str],
    stream: bool = False,
    extra_body: dict[str, Any] | None = None,
    system: str | None = None,
    api_key: str | None = None,
    request_timeout_s: float = 300.0,
    time_limit_s: float = 1800.0,
    on_done: Callable[[Sample], None] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    ramp_s: float = 0.0,
) -> Report:
    """Send ``requests`` requests, ``concurrency`` at a time; stop issuing at the time limit.

    ``ramp_s`` spreads the workers' first requests evenly over that many seconds: equal
    requests started together otherwise stay in lock-step waves, every one arriving at the
    same instant (set it to about one request's duration to measure a steady arrival rate).

    ``extra_body`` adds fields to every request (e.g. ``repeat_penalty``, which medserve,
    llama.cpp's server and llama-cpp-python's server all accept). ``system``, when given,
    is sent as a system message before every prompt (a shared preamble: the same text in
    every request, followed by the varying prompt).
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    samples: list[Sample] = []
    issued = 0
    started = time.perf_counter()
    deadline = started + time_limit_s
    # Built once: every client would otherwise load the CA bundle again (~10 ms each).
    tls = ssl.create_default_context()

    def client(connections: int) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        return httpx.AsyncClient(
            base_url=url.rstrip("/"),
            headers=headers,
            timeout=request_timeout_s,
            limits=limits,
            transport=transport,
            verify=tls,
        )

    async def worker(c: httpx.AsyncClient, delay: float) -> None:
        nonlocal issued
        if delay:
            await asyncio.sleep(delay)
        while issued < requests and time.perf_counter() < deadline:
            prompt = prompts[issued % len(prompts)]
            issued += 1
            sample = await _one(c, model, prompt, max_tokens, stream, extra_body or {}, system)
            samples.append(sample)
            if on_done is not None:
                on_done(sample)

    async with AsyncExitStack() as stack:
        if transport is not None:  # one client: it closes the caller's transport on exit
            shared = await stack.enter_async_context(client(concurrency))
            clients = [shared] * concurrency
        else:
            # One client (one keep-alive connection) per simulated user: httpcore's pool
            # scans all its connections on every request event, so a single pool of many
            # connections costs the load generator more CPU per request the higher the
            # concurrency (~10 ms per request at 64, measured), which a benchmark sharing
            # cores with the server under test cannot afford.
            clients = [await stack.enter_async_context(client(1)) for _ in range(concurrency)]
        step = ramp_s / concurrency
        await asyncio.gather(*(worker(c, k * step) for k, c in enumerate(clients)))
    duration = time.perf_counter() - started
    ok = [s for s in samples if s.ok]
    tokens = sum(s.output_tokens for s in ok)
    ttfts = [s.ttft_s for s in ok if s.ttft_s is not None]
    return Report(
        url=url,
        model=model,
        concurrency=concurrency,
        requests=len(samples),
        completed=len(ok),
        errors=dict(Counter(s.error or "unknown" for s in samples if not s.ok)),
        duration_s=duration,
        requests_per_s=len(ok) / duration if duration else 0.0,
        output_tokens=tokens,
        output_tokens_per_s=tokens / duration if duration else 0.0,
        latency_s=percentiles([s.latency_s for s in ok]),
        ttft_s=percentiles(ttfts),
        itl_s=percentiles([d for s in ok for d in s.itl_s], (50, 99)),
    )
