"""Each metric moves when it should, and labels never leave their bounded sets."""

from __future__ import annotations

import json
import logging
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from medserve.api.app import create_app
from medserve.config import Settings
from medserve.logs import JsonFormatter
from medserve.router import Router
from tests.conftest import AUTH, fake_spec

CHAT = "/v1/chat/completions"
MODEL = "fake-echo"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(client: TestClient) -> Samples:
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@contextmanager
def serving(**spec: Any) -> Iterator[TestClient]:
    app = create_app(Settings(instance="r1"), Router.from_specs([fake_spec(**spec)]))
    with TestClient(app, raise_server_exceptions=False, headers=AUTH) as client:
        yield client


def chat(text: str = "one two three four", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


def test_a_chat_request_moves_request_token_and_latency_metrics() -> None:
    with serving() as client:
        before = scrape(client)
        usage = client.post(CHAT, json=chat()).json()["usage"]
        after = scrape(client)
    ok = {"model": MODEL, "endpoint": CHAT, "status": "200"}
    assert delta(before, after, "medserve_requests_total", **ok) == 1
    m = {"model": MODEL}
    assert delta(before, after, "medserve_prompt_tokens_total", **m) == usage["prompt_tokens"]
    n = usage["completion_tokens"]
    assert delta(before, after, "medserve_generation_tokens_total", **m) == n
    for name in ("e2e_request_latency", "time_to_first_token", "request_queue"):
        assert delta(before, after, f"medserve_{name}_seconds_count", **m) == 1, name
    assert delta(before, after, "medserve_inter_token_latency_seconds_count", **m) == n - 1
    assert delta(before, after, "medserve_request_duration_seconds_count", endpoint=CHAT) == 1
    assert delta(before, after, "medserve_audit_records_total") >= 1
    assert delta(before, after, "medserve_audit_write_seconds_count") >= 1


def test_a_stream_moves_the_same_metrics() -> None:
    with serving() as client:
        before = scrape(client)
        body = {"model": MODEL, "prompt": "a b c d e", "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200 and list(r.iter_lines())
        after = scrape(client)
    m = {"model": MODEL}
    assert delta(before, after, "medserve_generation_tokens_total", **m) == 5
    assert delta(before, after, "medserve_time_to_first_token_seconds_count", **m) == 1
    assert delta(before, after, "medserve_inter_token_latency_seconds_count", **m) == 4


def test_refused_requests_count_by_status_without_a_model() -> None:
    with serving() as client:
        before = scrape(client)
        assert client.post(CHAT, json={**chat(), "model": "nope"}).status_code == 404
        assert client.post(CHAT, json=chat(n=3)).status_code == 400
        assert client.get("/v1/nothing").status_code == 404
        after = scrape(client)
    assert delta(before, after, "medserve_requests_total", model="", endpoint=CHAT, status="404")
    # The model was known by the time `n` was refused.
    bad_n = {"model": MODEL, "endpoint": CHAT, "status": "400"}
    assert delta(before, after, "medserve_requests_total", **bad_n) == 1
    unmatched = {"model": "", "endpoint": "unmatched", "status": "404"}
    assert delta(before, after, "medserve_requests_total", **unmatched) == 1


def test_a_huge_random_model_name_adds_no_label_value() -> None:
    name = "m-" + secrets.token_hex(2000)
    with serving() as client:
        client.post(CHAT, json=chat())
        before = scrape(client)
        for path in (CHAT, "/v1/completions"):
            client.post(path, json={**chat(), "prompt": "x", "model": name})
        client.get(f"/v1/models/{name}")
        after = scrape(client)
        text = client.get("/metrics").text
    assert name[:40] not in text
    labels = {(k, v) for _, ls in after for k, v in ls}
    assert {v for k, v in labels if k == "model"} <= {"", MODEL}
    assert {v for k, v in labels if k == "endpoint"} <= {
        CHAT,
        "/v1/completions",
        "/v1/models/{model_id:path}",
        "/metrics",
        "unmatched",
    }
    new_series = set(after) - set(before)
    assert all(dict(ls).get("model", "") in ("", MODEL) for _, ls in new_series)


def test_a_full_queue_counts_a_rejection() -> None:
    with serving(parallel=1, max_queue=0, fake_token_delay_s=0.01, context_length=512) as client:
        before = scrape(client)
        started = threading.Event()
        body = {"model": MODEL, "prompt": "w " * 100, "stream": True, "max_tokens": 100}

        def hold() -> None:
            with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                for _ in r.iter_lines():
                    started.set()

        holder = threading.Thread(target=hold)
        holder.start()
        assert started.wait(timeout=30)
        r = client.post(CHAT, json=chat())
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
        mid = scrape(client)
        holder.join(timeout=60)
        assert not holder.is_alive()
    assert delta(before, mid, "medserve_queue_rejections_total", model=MODEL) == 1
    assert value(mid, "medserve_requests_running", model=MODEL) == 1
    assert delta(before, mid, "medserve_requests_total", model=MODEL, endpoint=CHAT, status="503")


def test_engine_build_and_audit_state_are_exported() -> None:
    with serving() as client:
        samples = scrape(client)
    key = {"model": MODEL, "engine": "fake", "instance": "r1"}
    assert value(samples, "medserve_engine_up", **key) == 1
    assert value(samples, "medserve_engine_ready", **key) == 1
    assert ("medserve_model_load_seconds", (("model", MODEL),)) in samples
    assert value(samples, "medserve_audit_enabled") == 1
    builds = [ls for name, ls in samples if name == "medserve_build_info"]
    assert len(builds) == 1 and ("instance", "r1") in builds[0]
    assert value(samples, "medserve_egress_refusals_total") == 0


def test_the_scrape_is_neither_audited_nor_in_the_api_schema() -> None:
    with serving() as client:
        client.get("/metrics")
        samples = scrape(client)
        assert "/metrics" not in client.get("/openapi.json").json()["paths"]
    # config.loaded and server.start only: the scrapes left no records.
    assert value(samples, "medserve_audit_records_total") == 2


def test_each_request_logs_one_json_line_with_its_facts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="medserve.access")
    with serving() as client:
        r = client.post(CHAT, json=chat("seven eight nine"))
    lines = [rec for rec in caplog.records if rec.name == "medserve.access"]
    assert len(lines) == 1
    line = json.loads(JsonFormatter().format(lines[0]))
    assert line["request_id"] == r.headers["x-request-id"]
    assert (line["route"], line["status"], line["model"]) == (CHAT, 200, MODEL)
    usage = r.json()["usage"]
    assert line["prompt_tokens"] == usage["prompt_tokens"]
    assert line["completion_tokens"] == usage["completion_tokens"]
    assert line["finish_reason"] == "stop" and line["duration_ms"] >= 0
    assert "seven" not in json.dumps(line)
