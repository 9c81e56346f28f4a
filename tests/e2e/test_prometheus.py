"""Real Prometheus tooling against a real medserve: promtool on the page and the rules, a
real Prometheus scraping over loopback, and the dashboard and alerts naming only metrics
that exist."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import AUTH, ROOT
from tests.serverproc import (
    Server,
    fake_registry,
    free_port,
    running_process,
    running_server,
)
from tests.sse import iter_payloads

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        shutil.which("promtool") is None or shutil.which("prometheus") is None,
        reason="prometheus/promtool not installed (scripts/ensure-prometheus.sh installs them "
        "from Debian where apt-get runs as root)",
    ),
]

DEPLOY = ROOT / "deploy"
CHAT = {"model": "fake-echo", "messages": [{"role": "user", "content": "one two three"}]}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("prom")
    config = fake_registry(tmp / "fake.toml", context_length=512, fake_token_delay_s=0.005)
    with running_server(tmp / "serve.log", "-c", str(config)) as s:
        for _ in range(3):
            assert (
                httpx.post(f"{s.url}/v1/chat/completions", json=CHAT, headers=AUTH).status_code
                == 200
            )
        httpx.post(f"{s.url}/v1/chat/completions", json={**CHAT, "model": "nope"}, headers=AUTH)
        yield s


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *args], input=stdin, capture_output=True, text=True, timeout=60
    )


def wait_for(check: str, condition: Callable[[], bool], timeout_s: float = 60) -> None:
    """Poll (bounded) until ``condition()`` holds; fail naming ``check``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {check}")
        time.sleep(0.2)


def test_promtool_accepts_the_metrics_page(server: Server) -> None:
    page = httpx.get(f"{server.url}/metrics").text
    assert "medserve_requests_total" in page
    done = promtool("check", "metrics", stdin=page)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_accepts_the_alert_rules_and_scrape_config() -> None:
    done = promtool("check", "rules", str(DEPLOY / "prometheus" / "alerts.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    done = promtool("check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_alerts_fire_when_they_should() -> None:
    """promtool's rule unit tests (tests/e2e/alerts_test.yml): each alert there fires
    after its ``for`` with the labels and summary an operator sees, and not before."""
    done = promtool("test", "rules", str(ROOT / "tests" / "e2e" / "alerts_test.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_and_alerts_only_name_metrics_that_exist(server: Server) -> None:
    page = httpx.get(f"{server.url}/metrics").text
    # A sample's name, or a family's TYPE line: a family with no series on this server
    # (medserve_fallback_answers_total: it serves no fallback engine) is still declared.
    exported = set(re.findall(r"^(?:# TYPE )?(medserve_\w+)", page, re.MULTILINE))
    for file in (
        DEPLOY / "grafana" / "medserve-dashboard.json",
        DEPLOY / "prometheus" / "alerts.yml",
    ):
        named = set(re.findall(r"medserve_[a-z0-9_]+", file.read_text()))
        missing = {n for n in named if n not in exported}
        assert not missing, f"{file.name} names metrics medserve does not export: {missing}"


def test_client_disconnect_is_counted(server: Server) -> None:
    def disconnects() -> float:
        page = httpx.get(f"{server.url}/metrics").text
        found = re.search(
            r'^medserve_client_disconnects_total\{model="fake-echo"\} (\S+)', page, re.M
        )
        return float(found.group(1)) if found else 0.0

    before = disconnects()
    body = {"model": "fake-echo", "prompt": "w " * 200, "max_tokens": 200, "stream": True}
    url = f"{server.url}/v1/completions"
    with httpx.stream("POST", url, json=body, timeout=30, headers=AUTH) as r:
        next(iter_payloads(r.iter_lines()))  # leave after the first event
    wait_for("the disconnect to be counted", lambda: disconnects() == before + 1)


def test_a_real_prometheus_scrapes_medserve(server: Server, tmp_path: Path) -> None:
    port = free_port()
    target = server.url.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: medserve\n"
        f"    static_configs: [{{targets: ['{target}']}}]\n"
    )
    cmd = [
        "prometheus",
        f"--config.file={config}",
        f"--web.listen-address=127.0.0.1:{port}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
    ]
    api = f"http://127.0.0.1:{port}"
    with running_process(cmd, tmp_path / "prometheus.log", f"{api}/-/ready"):
        query = 'sum(medserve_requests_total{endpoint="/v1/chat/completions",status="200"})'

        def scraped() -> bool:
            r = httpx.get(f"{api}/api/v1/query", params={"query": query}, timeout=5).json()
            result = r["data"]["result"]
            return bool(result) and float(result[0]["value"][1]) >= 3

        wait_for("Prometheus to scrape medserve's request counter", scraped)
        up = httpx.get(f"{api}/api/v1/query", params={"query": "up"}, timeout=5).json()
        assert up["data"]["result"][0]["value"][1] == "1"
