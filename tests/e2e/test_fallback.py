"""GPU → CPU fallback end to end: `medserve serve` with a vLLM replica (the fake upstream,
serving a GPTQ artifact in name) and the real llama.cpp engine as fallback (the packaged
SmolLM2 GGUF in an artifact directory whose manifest names the same source checkpoint).

When the vLLM replica faults before its first event, llama.cpp answers, the response says
so and the audit record carries the GGUF's sha256; when the replica answers, llama.cpp is
never asked; a key created without fallback gets the replica's 503.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from medserve import manifest as mf
from medserve.auth.keys import KeyStore
from tests.artifacts import artifact, checkpoint, weights_sha256
from tests.conftest import AUTH, smollm2_path
from tests.fakeupstream import FakeUpstream, Knobs, running_upstream
from tests.serverproc import Server, running_server

pytestmark = [pytest.mark.e2e, pytest.mark.engine]
MODEL = "med"
TEXT = "Asthma causes wheezing"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "symptom?"}], "max_tokens": 8}
WAIT_S = 30.0  # bound on polling the audit log


@dataclass
class Gateway:
    server: Server
    upstream: FakeUpstream
    gptq: str  # weights_sha256 of the vLLM replica's artifact (its manifest's table)
    gguf: str  # sha256 of the GGUF file


def registry(base: Path, upstream: FakeUpstream) -> tuple[Path, str, str]:
    """The config file, and the replica's and the fallback's weights_sha256."""
    source = checkpoint(base / "ckpt")
    gptq = artifact(base / "gptq", source, "gptq")
    gguf = artifact(base / "gguf", source, gguf=smollm2_path())
    config = base / "medserve.toml"
    config.write_text(
        f'[[models]]\nid = "{MODEL}"\n'
        f'[[models.replicas]]\nengine = "vllm"\nurl = "{upstream.url}"\n'
        f'served_model_name = "m"\nmanifest = "gptq/{mf.NAME}"\n'
        '[[models.fallback]]\nengine = "llamacpp"\npath = "gguf/med-q4_k_m.gguf"\n'
        f'manifest = "gguf/{mf.NAME}"\ncontext_length = 256\nparallel = 1\nthreads = 2\n'
    )
    return config, weights_sha256(gptq), weights_sha256(gguf, "med-q4_k_m.gguf")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    base = tmp_path_factory.mktemp("fallback")
    with running_upstream() as upstream:
        config, gptq, gguf = registry(base, upstream)
        with running_server(base / "medserve.log", "-c", str(config)) as server:
            yield Gateway(server, upstream, gptq, gguf)


@pytest.fixture
def gw(gateway: Gateway) -> Gateway:
    gateway.upstream.knobs = Knobs(text=TEXT)
    gateway.upstream.seen.clear()
    return gateway


def post(gw: Gateway, stream: bool, headers: dict[str, str] = AUTH) -> httpx.Response:
    return httpx.post(
        f"{gw.server.url}/v1/chat/completions",
        json={**CHAT, "stream": stream},
        headers=headers,
        timeout=120,
    )


def fallback_answers(gw: Gateway) -> float:
    """medserve_fallback_answers_total of MODEL's llama.cpp fallback, from /metrics."""
    page = httpx.get(f"{gw.server.url}/metrics", timeout=10).text
    (found,) = [
        s.value
        for f in text_string_to_metric_families(page)
        for s in f.samples
        if s.name == "medserve_fallback_answers_total"
        and s.labels == {"model": MODEL, "engine": "llamacpp"}
    ]
    return found


FAULTS = {"503": Knobs(status=503, retry_after="4"), "500": Knobs(status=500)}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_the_cpu_fallback_answers_when_the_gpu_replica_faults(
    gw: Gateway, fault: str, stream: bool
) -> None:
    gw.upstream.knobs = FAULTS[fault]
    before = fallback_answers(gw)
    r = post(gw, stream)
    assert r.status_code == 200
    assert fallback_answers(gw) == before + 1
    assert (r.headers["x-medserve-fallback"], r.headers["x-medserve-engine"]) == (
        "llamacpp",
        "llamacpp:1",
    )
    if stream:
        assert r.text.rstrip().endswith("data: [DONE]")
    else:
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    facts = gw.server.audit_record(r.headers["x-request-id"])
    assert (facts["fallback"], facts["weights_sha256"]) == (True, gw.gguf)
    assert (facts["engine"], facts["replica"], facts["attempts"]) == ("llamacpp", "llamacpp:1", 2)
    assert gw.gguf == mf.sha256_file(smollm2_path())  # the file llama.cpp loaded


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_gpu_replica_that_answers_is_never_replaced(gw: Gateway, stream: bool) -> None:
    before = fallback_answers(gw)
    r = post(gw, stream)
    assert r.status_code == 200 and "x-medserve-fallback" not in r.headers
    assert fallback_answers(gw) == before
    assert r.headers["x-medserve-engine"] == "vllm:0"
    facts = gw.server.audit_record(r.headers["x-request-id"])
    assert (facts["fallback"], facts["weights_sha256"]) == (False, gw.gptq)
    assert len(gw.upstream.seen) == 1


def test_a_key_without_fallback_gets_the_gpu_replicas_503(gw: Gateway) -> None:
    _, token = KeyStore(gw.server.log.parent / "keys.db").create("strict", fallback=False)
    gw.upstream.knobs = Knobs(status=503, retry_after="4")
    r = post(gw, False, {"Authorization": f"Bearer {token}"})
    assert (r.status_code, r.headers["retry-after"]) == (503, "4")
    assert "x-medserve-fallback" not in r.headers
    facts = gw.server.audit_record(r.headers["x-request-id"])
    assert (facts["fallback"], facts["attempts"], facts["status"]) == (False, 1, 503)


def test_ready_says_which_engine_is_the_fallback(gw: Gateway) -> None:
    ready = httpx.get(f"{gw.server.url}/ready", headers=AUTH, timeout=10).json()
    marks = [(r["name"], r["fallback"]) for r in ready["models"][0]["replicas"]]
    assert marks == [("vllm:0", False), ("llamacpp:1", True)]
