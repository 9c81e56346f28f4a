"""`medserve serve` refuses to start on an audit log it cannot write, and says why.

A real process per case: it must exit non-zero with a message naming the path and the
fix, before it binds its port. A server that started anyway would answer 503 forever (its
SQLite handles opened read-only): the test fails as soon as the port answers.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import pytest

from medserve.audit import EventFacts, open_store
from medserve.config import AuditSettings
from tests.conftest import DEV_KEY, ROOT
from tests.faults import read_only
from tests.serverproc import fake_registry, free_port

pytestmark = pytest.mark.e2e

DEADLINE_S = 120


def existing_log(path: Path) -> Path:
    """A log with its keys and a record, closed: what a restarted server finds."""
    store = open_store(AuditSettings(path=path))
    try:
        asyncio.run(store.append(EventFacts("server.start")))
    finally:
        store.close()
    return path


Setup = Callable[[Path], tuple[Path, AbstractContextManager[object]]]


def ro_file(tmp: Path) -> tuple[Path, AbstractContextManager[object]]:
    db = existing_log(tmp / "audit" / "audit.db")
    return db, read_only(db)


def ro_dir(tmp: Path) -> tuple[Path, AbstractContextManager[object]]:
    db = existing_log(tmp / "audit" / "audit.db")
    return db, read_only(db.parent)


def parent_is_a_file(tmp: Path) -> tuple[Path, AbstractContextManager[object]]:
    (tmp / "volume").write_text("a regular file where a directory should be\n")
    return tmp / "volume" / "audit" / "audit.db", nullcontext()


def not_a_database(tmp: Path) -> tuple[Path, AbstractContextManager[object]]:
    db = tmp / "audit" / "audit.db"
    db.parent.mkdir()
    db.write_bytes(b"this is not an SQLite database\n" * 200)
    return db, nullcontext()


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize(
    ("setup", "named", "says"),
    [
        (ro_file, "file", "cannot be written"),
        (ro_dir, "file", "cannot open the audit log"),
        (parent_is_a_file, "dir", "cannot create the audit log's directory"),
        (not_a_database, "file", "is not an SQLite audit log"),
    ],
)
def test_serve_refuses_to_start_on_a_log_it_cannot_write(
    tmp_path: Path, setup: Setup, named: str, says: str
) -> None:
    db, fault = setup(tmp_path)
    fake_registry(tmp_path / "fake.toml")
    port = free_port()
    cmd = [sys.executable, "-m", "medserve", "serve", "-c", str(tmp_path / "fake.toml")]
    env = {
        **os.environ,
        "MEDSERVE_AUDIT__PATH": str(db),
        "MEDSERVE_AUTH__KEYS_PATH": str(tmp_path / "keys.db"),
        "MEDSERVE_AUTH__DEV_KEY": DEV_KEY,
        "COLUMNS": "500",  # rich would wrap the message (and the path in it) at 80
    }
    with fault:
        process = subprocess.Popen(
            [*cmd, "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + DEADLINE_S
            while process.poll() is None:
                assert not listening(port), "the server started on a log it cannot write"
                assert time.monotonic() < deadline, "the server neither started nor exited"
                time.sleep(0.1)
        finally:
            if process.poll() is None:
                process.kill()
            out, err = process.communicate(timeout=60)
    assert process.returncode == 2, out + err
    message = " ".join(err.split())
    assert "error: audit log:" in message
    assert str(db if named == "file" else db.parent) in message
    assert says in message
    assert "Uvicorn running" not in out + err and "Application startup" not in out + err
