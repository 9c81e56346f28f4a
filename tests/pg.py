"""A throwaway PostgreSQL for the tests: initdb + pg_ctl in a temp directory, socket only.

Real parts for real paths: the tests of medserve's PostgreSQL stores run against Debian's
own server binaries (``scripts/ensure-postgres.sh`` installs them), never a mock. One
server per test session, started on first use:

- its data directory and its unix socket live in one temp directory (``/tmp/medserve-pg-*``,
  mode 0700); ``listen_addresses`` is empty, so nothing listens on any network interface;
- it runs as an unprivileged user: initdb refuses root, so a test run as root runs the
  server as the system user :data:`PG_USER` (created with ``useradd`` when missing);
- every role logs in with a password (scram-sha-256), so connection strings carry one, as
  they do in production, and tests can check that it never leaks;
- ``fsync=off``: a crashed test server is thrown away, never recovered, so its files need
  not survive a power cut. A transaction still commits before the client hears so; what
  is measured for durability (tests/bench) starts its own server with ``fsync=on``.

Roles (cluster-wide, made once): the superuser :data:`SUPERUSER`, and the three roles of
the deployment the README describes: :data:`OWNER` (owns each database and its schema,
applies migrations), :data:`GATEWAY` (what a gateway logs in as) and :data:`AUDITOR`
(read-only). What each may do on the tables is granted by the schema's own migrations, not
here. :meth:`PgServer.database` hands out a fresh database, owned by :data:`OWNER`, copied
from a template (``CREATE DATABASE ... TEMPLATE``: a file copy, milliseconds).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

PG_USER = "medserve-pg"  # the system user a root test run starts the server as
SUPERUSER = "postgres"
OWNER = "medserve_owner"
GATEWAY = "medserve_gateway"
AUDITOR = "medserve_auditor"
ROLES = (OWNER, GATEWAY, AUDITOR)
START_TIMEOUT_S = 60


class PgUnavailable(Exception):
    """PostgreSQL is not installed here (or, as root, no user can be made to run it); the
    message is the tests' skip reason."""


class PgError(Exception):
    """PostgreSQL is installed but a tool failed: a real failure, never a skip. The message
    carries the tool's stderr and the end of the server's log."""


def find_bindir() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres: PATH first, then Debian's
    ``/usr/lib/postgresql/<major>/bin`` (newest major); None when PostgreSQL is absent."""
    on_path = shutil.which("pg_ctl")
    if on_path is not None:
        real = Path(on_path).resolve().parent
        if (real / "initdb").exists() and (real / "postgres").exists():
            return real
    majors = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return majors[-1].parent if majors else None


def _server_user() -> pwd.struct_passwd | None:
    """The user to run the server as: None (this one) unless running as root, where it is
    :data:`PG_USER`, created as a system user without a home or a shell if missing."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(PG_USER)
    except KeyError:
        pass
    useradd = shutil.which("useradd")
    if useradd is None:
        raise PgUnavailable(f"running as root, and no useradd to create the user {PG_USER}")
    done = subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode not in (0, 9):  # 9: it exists (another test run made it meanwhile)
        raise PgUnavailable(f"cannot create the user {PG_USER}: {done.stderr.strip()}")
    return pwd.getpwnam(PG_USER)


@dataclass(frozen=True)
class PgDatabase:
    """One test's database and a connection string per role (``postgresql://`` URLs with
    the password in them, over the server's unix socket)."""

    server: PgServer
    name: str

    def url(self, role: str = GATEWAY) -> str:
        return self.server.url(role, self.name)

    @property
    def superuser_url(self) -> str:
        return self.url(SUPERUSER)

    @property
    def owner_url(self) -> str:
        return self.url(OWNER)

    @property
    def gateway_url(self) -> str:
        return self.url(GATEWAY)

    @property
    def auditor_url(self) -> str:
        return self.url(AUDITOR)


class PgServer:
    """A PostgreSQL server of the test session's own. See the module docstring."""

    def __init__(self, bindir: Path, *, fsync: bool = False) -> None:
        self.bindir = bindir
        self.fsync = fsync
        self.root = Path(tempfile.mkdtemp(prefix="medserve-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root
        self.passwords = {role: secrets.token_urlsafe(18) for role in (SUPERUSER, *ROLES)}
        self._user = _server_user()
        self._names = itertools.count(1)
        self._started = False

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> None:
        """initdb, configure, start and make the roles; :class:`PgUnavailable` on failure."""
        if self._user is not None:
            os.chown(self.root, self._user.pw_uid, self._user.pw_gid)
        pwfile = self.root / "pw"
        pwfile.write_text(self.passwords[SUPERUSER] + "\n", encoding="utf-8")
        if self._user is not None:
            os.chown(pwfile, self._user.pw_uid, self._user.pw_gid)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "--pwfile",
            str(pwfile),
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        pwfile.unlink()
        (self.data / "pg_hba.conf").write_text("local all all scram-sha-256\n", encoding="utf-8")
        with (self.data / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write(
                "\n# medserve tests (tests/pg.py)\n"
                "listen_addresses = ''\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
                f"fsync = {'on' if self.fsync else 'off'}\n"
                "max_connections = 300\n"
                "shared_buffers = 64MB\n"
                "log_min_messages = warning\n"
            )
        self._pg_ctl_start()
        self._started = True
        with self.connect() as conn:
            for role in ROLES:
                conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{self.passwords[role]}'")

    def stop(self) -> None:
        """Stop the server (immediately: nothing in it is kept) and remove its directory."""
        if self._started:
            with contextlib.suppress(PgError):
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
            self._started = False
        shutil.rmtree(self.root, ignore_errors=True)

    def restart(self) -> None:
        """Kill the server as a crash would (``pg_ctl -m immediate stop``: every backend
        dies at once, every client connection is cut) and start it again on the same data
        directory and socket; returns once it accepts connections. Whatever a client held
        (connections, advisory locks, LISTENs) is gone; unlogged tables are emptied."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        self._pg_ctl_start()

    def _pg_ctl_start(self) -> None:
        """Start the server on its data directory; returns once it accepts connections."""
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.root / "server.log"),
            "-w",
            "-t",
            str(START_TIMEOUT_S),
            "start",
        )

    def log_text(self) -> str:
        """The server's log (for a failing test's message)."""
        try:
            return (self.root / "server.log").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def _run(self, tool: str, *args: str) -> None:
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        user: dict[str, Any] = {}
        if self._user is not None:
            user = {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}
            env["HOME"] = str(self.root)
        done = subprocess.run(
            [str(self.bindir / tool), *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=self.root,
            timeout=START_TIMEOUT_S + 30,
            **user,
        )
        if done.returncode != 0:
            raise PgError(
                f"{tool} failed ({done.returncode}): {done.stderr.strip()[-2000:]}\n"
                f"{self.log_text()[-2000:]}"
            )

    # -- connections -------------------------------------------------------------------

    def url(self, role: str, dbname: str = "postgres") -> str:
        """``postgresql://role:password@/dbname?host=<socket dir>``."""
        host = quote(str(self.socket_dir), safe="")
        return f"postgresql://{role}:{quote(self.passwords[role], safe='')}@/{dbname}?host={host}"

    def connect(self, dbname: str = "postgres") -> Any:
        """A superuser connection in autocommit mode (``psycopg.Connection``)."""
        import psycopg

        return psycopg.connect(self.url(SUPERUSER, dbname), autocommit=True)

    def database(self, template: str = "template0") -> PgDatabase:
        """A fresh, empty database owned by :data:`OWNER`, copied from ``template``."""
        name = f"t{os.getpid()}_{next(self._names)}"
        with self.connect() as conn:
            conn.execute(
                f"CREATE DATABASE {name} OWNER {OWNER} TEMPLATE {template} STRATEGY file_copy"
            )
        return PgDatabase(self, name)

    def drop(self, db: PgDatabase) -> None:
        """Drop ``db``, closing whatever connections are still open on it."""
        with self.connect() as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {db.name} WITH (FORCE)")


NOT_INSTALLED = (
    "PostgreSQL is not installed (scripts/ensure-postgres.sh installs Debian's postgresql "
    "package; `make test` runs it)"
)


def server(*, fsync: bool = False) -> PgServer:
    """A server, not started yet; :class:`PgUnavailable` (its message says why) when
    PostgreSQL is not installed here."""
    bindir = find_bindir()
    if bindir is None:
        raise PgUnavailable(NOT_INSTALLED)
    return PgServer(bindir, fsync=fsync)


@contextlib.contextmanager
def running(*, fsync: bool = False) -> Iterator[PgServer]:
    """A started :class:`PgServer`, stopped and removed on exit. Raises
    :class:`PgUnavailable` when PostgreSQL is not installed, :class:`PgError` when it is
    but will not start."""
    started = server(fsync=fsync)
    try:
        started.start()
        yield started
    finally:
        started.stop()
