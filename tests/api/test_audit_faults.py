"""A server whose audit log fails at run time answers 503 and recovers without a restart.

Real faults on the real store behind the app (fake engine): the log's files made
read-only under the server (root: the immutable attribute), and another connection
holding the write lock. After each is repaired, the next requests succeed on the same
server and `medserve audit verify` finds the chain intact.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from medserve.api.app import create_app
from medserve.cli import app as cli
from medserve.config import AuditSettings, Settings
from medserve.router import Router
from tests.conftest import AUTH, fake_spec
from tests.faults import read_only

CHAT = "/v1/chat/completions"
BODY = {"model": "fake-echo", "messages": [{"role": "user", "content": "one two"}]}


@contextmanager
def serving(audit_path: Path, **audit: Any) -> Iterator[TestClient]:
    conf = AuditSettings(path=audit_path, busy_timeout_ms=0, **audit)
    app = create_app(Settings(audit=conf), Router.from_specs([fake_spec()]))
    with TestClient(app, raise_server_exceptions=False, headers=AUTH) as client:
        yield client


@contextmanager
def files_read_only(db: Path) -> Iterator[None]:
    """The log and its WAL made read-only while the server has them open."""
    if os.geteuid() != 0:
        pytest.skip("a mode change does not stop writes to a file already open: needs root")
    with read_only(db, db.with_name(db.name + "-wal")):
        yield


@contextmanager
def write_locked(db: Path) -> Iterator[None]:
    """Another connection holds the write lock (busy timeout 0: commits fail at once)."""
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


Fault = Callable[[Path], AbstractContextManager[None]]
FAULTS = [pytest.param(files_read_only, id="read-only"), pytest.param(write_locked, id="locked")]


def statuses(db: Path) -> list[int]:
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT body FROM records WHERE kind = 'request' ORDER BY seq").fetchall()
    conn.close()
    return [json.loads(body)["status"] for (body,) in rows]


def verified(db: Path) -> str:
    result = CliRunner().invoke(cli, ["audit", "verify", "--db", str(db)])
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("fault", FAULTS)
def test_fail_closed_refuses_while_broken_and_recovers_without_restart(
    audit_path: Path, fault: Fault
) -> None:
    with serving(audit_path) as client:
        assert client.post(CHAT, json=BODY).status_code == 200
        with fault(audit_path):
            broken = [client.post(CHAT, json=BODY), client.post(CHAT, json=BODY)]
            ready = client.get("/ready")  # asks the writer to reopen: it cannot yet
            # The writer works in order: this record's failure comes after that attempt.
            broken.append(client.post(CHAT, json=BODY))
        for r in broken:
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "audit_unavailable"
            assert "retry-after" in r.headers
        assert ready.status_code == 503 and ready.json()["audit"]["writable"] is False
        # Repaired: the same server takes requests again. The first is still refused (the
        # log failed last), and its record is the write that reopens the log.
        assert client.get("/v1/models").status_code == 503
        assert client.post(CHAT, json=BODY).status_code == 200
        assert client.post(CHAT, json=BODY).status_code == 200
        assert client.get("/ready").status_code == 200
    # The refusals while broken could not be recorded; everything else is, in one chain.
    assert statuses(audit_path) == [200, 503, 200, 200]
    assert "intact" in verified(audit_path)


@pytest.mark.parametrize("fault", FAULTS)
def test_fail_open_serves_while_broken_counts_the_loss_and_recovers(
    audit_path: Path, fault: Fault
) -> None:
    with serving(audit_path, on_failure="open") as client:
        with fault(audit_path):
            broken = client.post(CHAT, json=BODY)
        assert broken.status_code == 200
        assert client.app.state.auditor.lost == 1  # type: ignore[attr-defined]
        assert client.post(CHAT, json=BODY).status_code == 200
    assert statuses(audit_path) == [200]
    assert "intact" in verified(audit_path)


def test_a_readiness_probe_recovers_a_server_that_gets_no_traffic(audit_path: Path) -> None:
    with serving(audit_path) as client:
        with write_locked(audit_path):
            assert client.post(CHAT, json=BODY).status_code == 503
        # A load balancer stopped sending requests; only its probe comes.
        deadline = time.monotonic() + 30
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, "the log was not reopened"
            time.sleep(0.05)
        assert client.post(CHAT, json=BODY).status_code == 200
    assert statuses(audit_path) == [200]
    assert "intact" in verified(audit_path)
