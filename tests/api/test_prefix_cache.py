"""The gateway around an engine's prefix cache, on the fake engine's (FakePrefixCache):
each model's ``cache_isolation`` sets the requests' ``cache_salt`` (the key's id, or none),
and the engines' counts reach /metrics and /ready, added up per model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from medserve.api.app import create_app
from medserve.auth import DEV_KEY_ID
from medserve.auth.keys import KeyStore
from medserve.config import ModelSpec, Settings
from medserve.engines.base import PrefixCacheStats
from medserve.engines.fake import TOKEN_BYTES, FakeEngine, FakePrefixCache, FakeSpec
from medserve.router import Router, Served
from tests.conftest import AUTH, fake_spec

MODEL = "fake-echo"
CONTEXT = 64
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
FAMILIES = {
    "medserve_prefix_cache_requests": ("counter", {"model", "result"}),
    "medserve_prefix_cache_prompt_tokens": ("counter", {"model"}),
    "medserve_prefix_cache_reused_tokens": ("counter", {"model"}),
    "medserve_prefix_cache_evictions": ("counter", {"model"}),
    "medserve_prefix_cache_bytes": ("gauge", {"model"}),
    "medserve_prefix_cache_capacity_bytes": ("gauge", {"model"}),
    "medserve_prefix_cache_entries": ("gauge", {"model"}),
}


def body(path: str, text: str) -> dict[str, Any]:
    if path == CHAT:
        return {"model": MODEL, "messages": [{"role": "user", "content": text}]}
    return {"model": MODEL, "prompt": text}


@contextmanager
def serving(spec: ModelSpec, *engines: FakeEngine) -> Iterator[TestClient]:
    """A server of the one model ``spec`` whose replicas are ``engines``."""
    app = create_app(Settings(), Router([Served(spec, engines)]))
    with TestClient(app, raise_server_exceptions=False, headers=AUTH) as client:
        yield client


def cached(entries: int = 2, **overrides: object) -> ModelSpec:
    """The test model with ``entries`` prompts kept by its fake's prefix cache."""
    return fake_spec(context_length=CONTEXT, prefix_cache_entries=entries, **overrides)


# --- cache_isolation: the salt each key's requests carry -------------------------------


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS], ids=["chat", "completions"])
@pytest.mark.parametrize("policy", ["shared", "key"])
def test_isolation_sets_the_salt_to_the_key_id_or_none(
    tmp_path: Path, path: str, policy: str
) -> None:
    """With ``key`` each request carries its key's id as ``cache_salt`` (the dev key's is
    ``dev``); with ``shared`` none. The same text from another key then reuses the first
    key's prompt KV only when shared."""
    issued, token = KeyStore(tmp_path / "keys.db").create("triage-app", "user", [MODEL])
    spec = cached(entries=8, cache_isolation=policy)
    engine = FakeEngine(spec)
    text = "the same long preamble then a question"
    with serving(spec, engine) as client:
        for auth in ({"Authorization": f"Bearer {token}"}, AUTH):
            r = client.post(path, json=body(path, text), headers=auth)
            assert r.status_code == 200, r.text
    salts = [g.request.cache_salt for g in engine.history]
    # The dev key's id is the fixed "dev"; issued ids are 12 hex digits, never "dev".
    assert salts == ([issued.id, "dev"] if policy == "key" else [None, None])
    stats = engine.prefix_cache_stats()
    assert stats is not None
    assert (stats.hits, stats.misses) == ((1, 1) if policy == "shared" else (0, 2))


def test_a_key_reuses_its_own_prefix_under_key_isolation() -> None:
    spec = cached(entries=8, cache_isolation="key")
    engine = FakeEngine(spec)
    with serving(spec, engine) as client:
        for text in ("preamble a b c first", "preamble a b c second"):
            assert client.post(COMPLETIONS, json=body(COMPLETIONS, text)).status_code == 200
    stats = engine.prefix_cache_stats()
    assert stats is not None
    assert (stats.hits, stats.misses, stats.reused_tokens) == (1, 1, 4)
    assert {g.request.cache_salt for g in engine.history} == {DEV_KEY_ID}


# --- the fake's counts, which the gateway tests below rely on ---------------------------

# (prompt, tokens reused): words are tokens; at most 2 prompts kept.
LOOKUPS = [
    ("alpha b c d", 0),  # nothing kept yet
    ("alpha b c d", 3),  # the same prompt: all but its last token
    ("alpha b q", 2),  # a shared head, then a different tail
    ("beta x y", 0),  # nothing in common; "alpha b c d" is the oldest and goes
    ("alpha b c d", 2),  # only "alpha b q" left to share with
]


def test_the_fake_cache_counts_heads_per_salt_and_evicts_the_oldest() -> None:
    cache = FakePrefixCache(entries=2, context_length=CONTEXT)
    for text, reused in LOOKUPS:
        assert cache.lookup(None, FakeEngine._tokenize(text).token_ids) == reused, text
    assert cache.lookup("other-key", FakeEngine._tokenize("alpha b c d").token_ids) == 0
    s = cache.stats()
    assert (s.hits, s.misses, s.reused_tokens) == (3, 3, 7)
    assert s.prompt_tokens == sum(len(t.split()) for t, _ in LOOKUPS) + 4
    assert (s.entries, s.evictions) == (2, 3)
    assert (s.bytes, s.capacity_bytes) == (TOKEN_BYTES * 8, TOKEN_BYTES * 2 * CONTEXT)


# --- /metrics and /ready -----------------------------------------------------------------


def scrape(client: TestClient) -> dict[str, Any]:
    r = client.get("/metrics")
    assert r.status_code == 200
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def samples(families: dict[str, Any], model: str = MODEL) -> dict[tuple[str, str], float]:
    """(sample name, result label or "") -> value of ``model``'s prefix-cache series."""
    return {
        (s.name, s.labels.get("result", "")): s.value
        for name in FAMILIES
        for s in families[name].samples
        if s.labels.get("model") == model and not s.name.endswith("_created")
    }


def test_the_metrics_move_with_the_engines_counts() -> None:
    spec = cached()
    with serving(spec, FakeEngine(spec)) as client:
        before = samples(scrape(client))
        for text, _ in LOOKUPS:
            r = client.post(COMPLETIONS, json=body(COMPLETIONS, text))
            assert r.status_code == 200
        families = scrape(client)
    after = samples(families)
    for name, (kind, labels) in FAMILIES.items():
        assert families[name].type == kind, name
        for s in families[name].samples:
            assert set(s.labels) == labels, s
    assert before[("medserve_prefix_cache_requests_total", "hit")] == 0
    assert before[("medserve_prefix_cache_capacity_bytes", "")] == TOKEN_BYTES * 2 * CONTEXT
    assert after == {
        ("medserve_prefix_cache_requests_total", "hit"): 3,
        ("medserve_prefix_cache_requests_total", "miss"): 2,
        ("medserve_prefix_cache_prompt_tokens_total", ""): 18,
        ("medserve_prefix_cache_reused_tokens_total", ""): 7,
        ("medserve_prefix_cache_evictions_total", ""): 2,
        ("medserve_prefix_cache_bytes", ""): TOKEN_BYTES * 7,
        ("medserve_prefix_cache_capacity_bytes", ""): TOKEN_BYTES * 2 * CONTEXT,
        ("medserve_prefix_cache_entries", ""): 2,
    }


def test_metrics_and_ready_add_up_the_replicas_that_report() -> None:
    """Two replicas with a prefix cache and one without: /metrics and /ready give the
    two's counts added up; the third (None) adds nothing."""
    spec = ModelSpec.model_validate(
        {
            "id": MODEL,
            "replicas": [
                {"engine": "fake", "context_length": CONTEXT, "prefix_cache_entries": 2},
                {"engine": "fake", "context_length": CONTEXT, "prefix_cache_entries": 3},
                {"engine": "fake", "context_length": CONTEXT},
            ],
        }
    )
    engines = tuple(FakeEngine(spec, r) for r in spec.replicas if isinstance(r, FakeSpec))
    first, second, bare = engines
    assert first.prefix_cache and second.prefix_cache and bare.prefix_cache is None
    for text, _ in LOOKUPS:
        first.prefix_cache.lookup(None, FakeEngine._tokenize(text).token_ids)
    for text in ("alpha b", "alpha b c"):
        second.prefix_cache.lookup(None, FakeEngine._tokenize(text).token_ids)
    a, b = first.prefix_cache.stats(), second.prefix_cache.stats()
    total = PrefixCacheStats(**{k: v + asdict(b)[k] for k, v in asdict(a).items()})
    assert total.hits == 4 and total.capacity_bytes == TOKEN_BYTES * 5 * CONTEXT
    with serving(spec, *engines) as client:
        metrics = samples(scrape(client))
        (model,) = client.get("/ready").json()["models"]
    assert model["prefix_cache"] == asdict(total)
    assert metrics[("medserve_prefix_cache_requests_total", "hit")] == total.hits
    assert metrics[("medserve_prefix_cache_requests_total", "miss")] == total.misses
    assert metrics[("medserve_prefix_cache_reused_tokens_total", "")] == total.reused_tokens
    assert metrics[("medserve_prefix_cache_bytes", "")] == total.bytes
    assert metrics[("medserve_prefix_cache_entries", "")] == total.entries


@pytest.mark.parametrize("entries", [0, 2], ids=["no cache", "cache"])
def test_ready_shows_the_prefix_cache_only_when_an_engine_has_one(entries: int) -> None:
    spec = cached(entries=entries)
    with serving(spec, FakeEngine(spec)) as client:
        assert client.post(COMPLETIONS, json=body(COMPLETIONS, "a b c")).status_code == 200
        r = client.get("/ready")
        families = scrape(client)
    assert r.status_code == 200
    (model,) = r.json()["models"]
    if entries == 0:
        assert "prefix_cache" not in model
        assert samples(families) == {}
        assert all(name in families for name in FAMILIES)  # declared, without series
        return
    expected = PrefixCacheStats(
        misses=1,
        prompt_tokens=3,
        bytes=TOKEN_BYTES * 3,
        capacity_bytes=TOKEN_BYTES * entries * CONTEXT,
        entries=1,
    )
    assert model["prefix_cache"] == asdict(expected)
