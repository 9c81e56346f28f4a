"""The audit log under load, and across a `kill -9`, on real `medserve serve` processes.

The fake engine keeps these fast; the audit store, the HTTP server and the CLI are real.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from medserve import bench
from tests.conftest import AUTH, DEV_KEY, ROOT, SECRET
from tests.serverproc import fake_registry, running_server

pytestmark = pytest.mark.e2e


def config(tmp_path: Path, delay: float = 0.0) -> Path:
    return fake_registry(tmp_path / "fake.toml", context_length=512, fake_token_delay_s=delay)


def audit_cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "medserve", "audit", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def request_records(db: Path) -> list[dict[str, object]]:
    conn = sqlite3.connect(db)
    bodies = conn.execute("SELECT body FROM records WHERE kind = 'request'").fetchall()
    conn.close()
    return [json.loads(b) for (b,) in bodies]


def test_2000_requests_at_64_concurrency_leave_2000_records(tmp_path: Path) -> None:
    db = tmp_path / "audit" / "audit.db"
    env = {"MEDSERVE_AUDIT__PATH": str(db)}
    with running_server(tmp_path / "serve.log", "-c", str(config(tmp_path)), env=env) as server:
        report = asyncio.run(
            bench.run(
                server.url,
                "fake-echo",
                concurrency=64,
                requests=2000,
                max_tokens=16,
                prompts=[f"{SECRET} asks about dosing number {i}" for i in range(50)],
                request_timeout_s=120,
                time_limit_s=600,
                api_key=DEV_KEY,
            )
        )
    assert report.completed == 2000, report.errors
    records = request_records(db)
    assert len(records) == 2000
    assert all(r["status"] == 200 and r["endpoint"] == "/v1/chat/completions" for r in records)
    assert len({r["request_id"] for r in records}) == 2000
    done = audit_cli("verify", "--db", str(db), "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["records"] == 2000 + 3  # config, start, stop events


def test_kill_9_mid_load_loses_no_completed_record(tmp_path: Path) -> None:
    db = tmp_path / "audit" / "audit.db"
    env = {"MEDSERVE_AUDIT__PATH": str(db), "MEDSERVE_AUDIT__CHECKPOINT_EVERY": "50"}
    args = ("-c", str(config(tmp_path, delay=0.002)))
    completed: list[str] = []
    lock = threading.Condition()
    body = {
        "model": "fake-echo",
        "messages": [{"role": "user", "content": f"{SECRET} " + "word " * 20}],
    }

    def client(url: str) -> None:
        with httpx.Client(timeout=30, headers=AUTH) as http:
            for _ in range(500):  # bounded; the kill ends it much sooner
                try:
                    r = http.post(f"{url}/v1/chat/completions", json=body)
                except httpx.TransportError:
                    return
                if r.status_code == 200:
                    with lock:
                        completed.append(r.headers["x-request-id"])
                        lock.notify_all()

    with running_server(tmp_path / "first.log", *args, env=env) as server:
        threads = [threading.Thread(target=client, args=(server.url,)) for _ in range(16)]
        for t in threads:
            t.start()
        with lock:
            assert lock.wait_for(lambda: len(completed) >= 300, timeout=120)
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=30)
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads)
    seen = set(completed)

    with running_server(tmp_path / "second.log", *args, env=env) as server:
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30, headers=AUTH)
        assert r.status_code == 200
    done = audit_cli("verify", "--db", str(db))
    assert done.returncode == 0, done.stdout + done.stderr
    recorded = {str(r["request_id"]) for r in request_records(db)}
    assert seen <= recorded, f"{len(seen - recorded)} completed requests have no record"
    assert r.headers["x-request-id"] in recorded
    for path in [*db.parent.iterdir(), tmp_path / "first.log", tmp_path / "second.log"]:
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
