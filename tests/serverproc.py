"""Start `medserve serve` as a subprocess on a free loopback port (tests and benchmarks)."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import AUTH, DEV_KEY

ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 90
FAKE_MODEL = "fake-echo"


AUDIT_WAIT_S = 30.0  # bound on polling the audit log for one record


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def audit_record(self, request_id: str) -> dict[str, object]:
        """The audit record of ``request_id`` (the default audit log beside the server's
        log), polled for at most AUDIT_WAIT_S: a failure's record is written after its
        response."""
        db = self.log.parent / "audit" / "audit.db"
        deadline = time.monotonic() + AUDIT_WAIT_S
        while time.monotonic() < deadline:
            conn = sqlite3.connect(db)
            try:
                rows = conn.execute("SELECT body FROM records WHERE kind = 'request'").fetchall()
            finally:
                conn.close()
            for (body,) in rows:
                found: dict[str, object] = json.loads(body)
                if found.get("request_id") == request_id:
                    return found
            time.sleep(0.05)
        raise AssertionError(f"no audit record for {request_id} within {AUDIT_WAIT_S} s")


def fake_registry(path: Path, **fields: float) -> Path:
    """Write a registry file at ``path`` serving one fake model, ``fake-echo`` (flat form);
    ``fields`` are more keys of its entry (``context_length``, ``parallel``, ``max_queue``,
    ``fake_token_delay_s``: see :class:`medserve.engines.fake.FakeSpec`). Returns ``path``."""
    entry = ["[[models]]", f'id = "{FAKE_MODEL}"', 'engine = "fake"']
    entry += [f"{key} = {value}" for key, value in fields.items()]
    path.write_text("\n".join(entry) + "\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_process(
    cmd: list[str],
    log: Path,
    ready_url: str,
    env: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` (output to ``log``) until ``ready_url`` answers 200; stop it on exit.

    The wait is bounded by ``startup_timeout_s`` and fails fast, with the log, if the
    process dies.
    """
    with log.open("wb") as out:
        process = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{cmd[:3]} exited {process.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(ready_url, timeout=2, headers=headers).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[:3]} not ready in time:\n{log.read_text()}")
            time.sleep(0.2)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def running_server(
    log: Path,
    *args: str,
    env: dict[str, str] | None = None,
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
) -> Iterator[Server]:
    """`medserve serve` with ``args`` (and extra ``env``) on a free loopback port, ready
    (/ready 200) within ``startup_timeout_s``.

    Its audit log and keys go beside ``log``, and it accepts DEV_KEY, unless ``env`` says
    otherwise.
    """
    env = {
        "MEDSERVE_AUDIT__PATH": str(log.parent / "audit" / "audit.db"),
        "MEDSERVE_AUTH__KEYS_PATH": str(log.parent / "keys.db"),
        "MEDSERVE_AUTH__DEV_KEY": DEV_KEY,
        **(env or {}),
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "medserve", "serve", "--host", "127.0.0.1", "--port", str(port)]
    ready = f"{url}/ready"
    with running_process([*cmd, *args], log, ready, env, AUTH, startup_timeout_s) as process:
        yield Server(url, process, log)
