"""Two `medserve serve` processes (fake engine) writing one PostgreSQL audit log: under
load, and across a `kill -9` of one of them. The servers, the store, the database and the
CLI are real."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import psycopg
import pytest

from medserve import bench
from tests import pg
from tests.conftest import AUTH, DEV_KEY, ROOT, SECRET
from tests.serverproc import Server, fake_registry, running_server

pytestmark = pytest.mark.e2e


def audit_cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "medserve", "audit", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def request_ids(db: pg.PgDatabase) -> list[str]:
    with psycopg.connect(db.auditor_url) as conn:
        rows = conn.execute(
            "SELECT convert_from(body, 'UTF8')::json->>'request_id' FROM audit_records "
            "WHERE kind = 'request'"
        ).fetchall()
    return [str(r[0]) for r in rows]


@contextmanager
def gateway(
    tmp_path: Path, db: pg.PgDatabase, name: str, log: str, delay: float = 0.0
) -> Iterator[Server]:
    """A gateway logging in as the gateway role, instance ``name``; every gateway shares
    the audit keys (in tmp_path/audit, made by the first)."""
    registry = fake_registry(tmp_path / "fake.toml", context_length=512, fake_token_delay_s=delay)
    env = {
        "MEDSERVE_AUDIT__URL": db.gateway_url,
        "MEDSERVE_AUDIT__CHECKPOINT_EVERY": "100",
        "MEDSERVE_INSTANCE": name,
    }
    with running_server(tmp_path / log, "-c", str(registry), env=env) as server:
        yield server


@pytest.fixture
def db(pg_db: pg.PgDatabase) -> pg.PgDatabase:
    done = audit_cli("migrate", "--db", pg_db.owner_url)
    assert done.returncode == 0, done.stderr
    return pg_db


def verify(db: pg.PgDatabase, audit_dir: Path) -> dict[str, object]:
    done = audit_cli(
        "verify", "--db", db.auditor_url, "--key", str(audit_dir / "audit.key"), "--json"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_2000_requests_over_two_gateways_leave_2000_records(
    tmp_path: Path, db: pg.PgDatabase
) -> None:
    with ExitStack() as stack:
        servers = [
            stack.enter_context(gateway(tmp_path, db, f"gw-{i}", f"gw-{i}.log")) for i in (1, 2)
        ]

        async def load() -> list[bench.Report]:
            return await asyncio.gather(
                *(
                    bench.run(
                        s.url,
                        "fake-echo",
                        concurrency=32,
                        requests=1000,
                        max_tokens=16,
                        prompts=[f"{SECRET} asks about dosing number {i}" for i in range(50)],
                        request_timeout_s=120,
                        time_limit_s=600,
                        api_key=DEV_KEY,
                    )
                    for s in servers
                )
            )

        reports = asyncio.run(load())
    assert [r.completed for r in reports] == [1000, 1000], [r.errors for r in reports]
    ids = request_ids(db)
    assert len(ids) == 2000 and len(set(ids)) == 2000
    result = verify(db, tmp_path / "audit")
    assert result["records"] == 2000 + 2 * 3  # config, start, stop events of each
    assert result["instances"] == 2
    with psycopg.connect(db.auditor_url) as conn:
        bodies = b"".join(bytes(b) for (b,) in conn.execute("SELECT body FROM audit_records"))
    assert SECRET.encode() not in bodies
    assert all(p.encode() not in bodies for p in db.server.passwords.values())


def test_a_gateway_role_on_a_schema_it_cannot_migrate_refuses_to_start(
    tmp_path: Path, pg_db: pg.PgDatabase
) -> None:
    registry = fake_registry(tmp_path / "fake.toml", context_length=512)
    env = {
        **os.environ,
        "MEDSERVE_AUDIT__URL": pg_db.gateway_url,
        "MEDSERVE_AUDIT__PATH": str(tmp_path / "audit" / "audit.db"),
    }
    cmd = [sys.executable, "-m", "medserve", "serve", "--port", "9", "-c", str(registry)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    said = " ".join((done.stdout + done.stderr).split())
    assert done.returncode != 0
    assert "medserve audit migrate" in said, said
    assert pg_db.server.passwords[pg.GATEWAY] not in said, said


def test_kill_9_of_one_gateway_loses_no_completed_record(tmp_path: Path, db: pg.PgDatabase) -> None:
    completed: list[str] = []
    lock = threading.Condition()
    body = {
        "model": "fake-echo",
        "messages": [{"role": "user", "content": f"{SECRET} " + "word " * 20}],
    }

    def client(url: str) -> None:
        with httpx.Client(timeout=30, headers=AUTH) as http:
            for _ in range(400):  # bounded; the kill ends the victim's clients sooner
                try:
                    r = http.post(f"{url}/v1/chat/completions", json=body)
                except httpx.TransportError:
                    return
                if r.status_code == 200:
                    with lock:
                        completed.append(r.headers["x-request-id"])
                        lock.notify_all()

    with (
        gateway(tmp_path, db, "gw-1", "gw-1.log", delay=0.002) as survivor,
        gateway(tmp_path, db, "gw-2", "first.log", delay=0.002) as victim,
    ):
        threads = [
            threading.Thread(target=client, args=(s.url,))
            for s in (survivor, victim)
            for _ in range(8)
        ]
        for t in threads:
            t.start()
        with lock:
            assert lock.wait_for(lambda: len(completed) >= 300, timeout=120)
        os.kill(victim.process.pid, signal.SIGKILL)
        victim.process.wait(timeout=30)
        with gateway(tmp_path, db, "gw-2", "second.log", delay=0.002) as again:
            r = httpx.post(f"{again.url}/v1/chat/completions", json=body, timeout=30, headers=AUTH)
            assert r.status_code == 200
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
    seen = set(completed)
    recorded = set(request_ids(db))
    assert seen <= recorded, f"{len(seen - recorded)} completed requests have no record"
    assert r.headers["x-request-id"] in recorded
    result = verify(db, tmp_path / "audit")
    assert result["instances"] == 2
    for path in tmp_path.glob("*.log"):
        text = path.read_bytes()
        assert SECRET.encode() not in text, path
        assert all(p.encode() not in text for p in db.server.passwords.values()), path
