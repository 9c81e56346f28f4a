"""The supervised engine's shim: one small process between medserve and a vLLM server.

Usage (the supervisor builds it; standard library only, run by path with ``python -I``)::

    python -I shim.py --parent PID --term-timeout S --log FILE [--run-dir DIR] -- ARGV...

Why a process of its own: vLLM is a tree (API server, ``VLLM::EngineCore``,
``VLLM::Worker_*``), and a SIGKILL of its API server leaves the engine processes alive,
holding the GPU (vllm#55510). medserve itself can be SIGKILLed at any time, and then runs
no cleanup. The shim, started by medserve in a session of its own:

- asks the kernel for SIGHUP when medserve dies (``PR_SET_PDEATHSIG``; also checked each
  second with ``getppid``, for the window before the call) and becomes a *child
  subreaper* (``PR_SET_CHILD_SUBREAPER``): processes orphaned inside the vLLM tree are
  re-parented to it instead of to init, so it can still find and kill them;
- runs ARGV as its child in a new process group, with SIGKILL as that child's own
  parent-death signal, stdin from /dev/null and stdout+stderr into FILE, rotated at
  :data:`LOG_BYTES` with :data:`LOG_BACKUPS` old files kept (``FILE.1`` is the newest);
- on SIGTERM/SIGINT (stop) or SIGHUP (medserve died): SIGTERM to the child's process group
  and to every other process of the instance (:func:`instance_pids`), waits up to
  ``--term-timeout`` seconds for them to exit, then SIGKILLs whatever is left, reaps, and
  exits;
- when the child exits by itself: the same clean-up of what it left behind, then exits
  with the child's code (128 + N when signal N killed it);
- when medserve died, it also removes ``--run-dir`` (vLLM's IPC sockets and TMPDIR), which
  no supervisor is left to remove.

Its own exit codes: :data:`EXIT_USAGE` (125) for bad shim arguments or a failed set-up,
126 when ARGV[0] cannot be executed, 127 when it does not exist (the shell's codes), each
with one line in FILE. The umask is 077: the log, and whatever vLLM writes (caches, IPC
sockets), is readable by this user only.

The /proc helpers here (:func:`processes`, :func:`instance_pids`) are also what the
supervisor uses to check that nothing of an instance is left.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36
EXIT_USAGE = 125
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127
LOG_BYTES = 10 * 1024 * 1024  # vLLM logs a few kB per start and a line per 10 s of stats
LOG_BACKUPS = 3
KILL_WAIT_S = 10.0  # after SIGKILL: how long to reap before giving up (a process in D state)
# The parent-death signal: not SIGTERM, which is the supervisor's "stop". Its sender
# cannot tell them apart: the kernel signals when the forking *thread* dies, and while the
# rest of a multi-threaded medserve is still exiting getppid() still names it.
PARENT_DIED = signal.SIGHUP
SIGNALS = {signal.SIGTERM, signal.SIGINT, PARENT_DIED, signal.SIGCHLD}


@functools.cache
def libc() -> ctypes.CDLL:
    """The C library (loaded once: the child's set-up between fork and exec must not)."""
    return ctypes.CDLL(None, use_errno=True)


def prctl(option: int, value: int) -> None:
    """``prctl(option, value)`` through libc; OSError on failure."""
    if libc().prctl(option, ctypes.c_ulong(value), 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def set_name(name: str) -> None:
    """Set this process's ``comm`` (what ``ps`` and ``/proc/PID/comm`` show; 15 bytes)."""
    buffer = ctypes.create_string_buffer(name.encode()[:15])
    libc().prctl(PR_SET_NAME, buffer, 0, 0, 0)


@dataclass(frozen=True, slots=True)
class Proc:
    """One line of ``/proc/PID/stat``: what the clean-up needs."""

    pid: int
    name: str
    state: str
    ppid: int
    pgrp: int
    session: int


def processes() -> dict[int, Proc]:
    """Every process visible in /proc now, by pid (those that vanish meanwhile are skipped)."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                raw = f.read().decode("utf-8", "replace")
        except OSError:
            continue
        # "pid (comm) state ppid pgrp session ...": comm may hold spaces and parentheses.
        head, _, rest = raw.rpartition(")")
        fields = rest.split()
        if len(fields) < 4:
            continue
        pid = int(entry.name)
        name = head.partition("(")[2]
        found[pid] = Proc(pid, name, fields[0], int(fields[1]), int(fields[2]), int(fields[3]))
    return found


def environ_has(pid: int, entry: bytes) -> bool:
    """Whether ``entry`` (``NAME=value``) is in the environment ``pid`` started with."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return entry in f.read().split(b"\0")
    except OSError:  # gone, or another user's process
        return False


def descendants(root: int, procs: dict[int, Proc]) -> set[int]:
    """Pids below ``root`` in the parent tree (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p.pid)
    found: set[int] = set()
    todo = list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def instance_pids(
    *,
    sessions: Iterable[int] = (),
    groups: Iterable[int] = (),
    roots: Iterable[int] = (),
    marker: bytes | None = None,
    exclude: Iterable[int] = (),
) -> set[int]:
    """Live (not zombie) processes of one instance: in one of ``sessions`` or process
    ``groups``, below one of ``roots``, or started with ``marker`` (``NAME=value``) in their
    environment, which catches a process that left the session with ``setsid``."""
    procs = processes()
    sessions, groups, skip = set(sessions), set(groups), set(exclude)
    found = {p.pid for p in procs.values() if p.session in sessions or p.pgrp in groups}
    for root in roots:
        found |= descendants(root, procs)
    if marker is not None:
        found |= {pid for pid in procs if pid not in found and environ_has(pid, marker)}
    return {pid for pid in found - skip if procs.get(pid) and procs[pid].state not in "ZX"}


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


class LogPump(threading.Thread):
    """Copies the child's output (a pipe) into the rotated log file until EOF."""

    def __init__(self, fd: int, path: Path) -> None:
        super().__init__(name="log-pump", daemon=True)
        self.fd, self.path = fd, path

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    def _rotate(self, out: int) -> int:
        os.close(out)
        for n in range(LOG_BACKUPS - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        return self._open()

    def run(self) -> None:
        out = self._open()
        size = os.fstat(out).st_size
        try:
            while chunk := os.read(self.fd, 65536):
                if size and size + len(chunk) > LOG_BYTES:
                    out, size = self._rotate(out), 0
                os.write(out, chunk)
                size += len(chunk)
        finally:
            os.close(out)
            os.close(self.fd)


def note(log: Path, line: str) -> None:
    """One line of the shim's own into the log (its only output)."""
    with contextlib.suppress(OSError):
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, f"[medserve shim] {line}\n".encode())
        finally:
            os.close(fd)


class Shim:
    """The running shim: its child, the reaping, the clean-up."""

    def __init__(
        self, parent: int, term_timeout: float, log: Path, run_dir: Path | None = None
    ) -> None:
        self.parent, self.term_timeout, self.log = parent, term_timeout, log
        self.run_dir = run_dir
        self.me = os.getpid()
        self.child: int | None = None
        self.status: int | None = None  # the child's exit code (128 + N for signal N)

    def reap(self) -> None:
        """Collect every exited child (our own and re-parented orphans)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.child:
                code = os.waitstatus_to_exitcode(status)
                self.status = code if code >= 0 else 128 - code

    def leftovers(self, outside: int | None = None) -> set[int]:
        """Live processes of the instance but this one (those not in process group
        ``outside``, when given)."""
        groups = [self.child] if self.child is not None else []
        found = instance_pids(
            sessions=[os.getsid(0)], groups=groups, roots=[self.me], exclude=[self.me]
        )
        if outside is not None:
            found = {pid for pid in found if _pgid(pid) not in (outside, None)}
        return found

    def wait_gone(self, seconds: float) -> set[int]:
        """Reap until nothing of the instance is left or ``seconds`` pass; what is left."""
        deadline = time.monotonic() + seconds
        while True:
            self.reap()
            left = self.leftovers()
            remaining = deadline - time.monotonic()
            if not left or remaining <= 0:
                return left
            signal.sigtimedwait({signal.SIGCHLD}, min(0.05, remaining))

    def clean_up(self) -> None:
        """SIGTERM, wait, SIGKILL: the child's group and everything else of the instance.

        One SIGTERM per process: a second one makes uvicorn (vLLM's server) skip its
        graceful shutdown."""
        if self.child is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.child, signal.SIGTERM)
        signal_all(self.leftovers(outside=self.child), signal.SIGTERM)
        left = self.wait_gone(self.term_timeout)
        if left:
            note(self.log, f"still running after {self.term_timeout:g} s: SIGKILL {sorted(left)}")
            if self.child is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.child, signal.SIGKILL)
            signal_all(left, signal.SIGKILL)
            left = self.wait_gone(KILL_WAIT_S)
            if left:
                note(self.log, f"processes survived SIGKILL: {sorted(left)}")

    def run(self, argv: list[str]) -> int:
        def child_setup() -> None:  # in the child, between fork and exec
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            signal.pthread_sigmask(signal.SIG_SETMASK, set())

        read_end, write_end = os.pipe()
        try:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=write_end,
                stderr=write_end,
                process_group=0,
                preexec_fn=child_setup,
            )
        except OSError as exc:
            os.close(read_end)
            os.close(write_end)
            note(self.log, f"cannot run {argv[0]}: {exc.strerror or exc}")
            missing = isinstance(exc, FileNotFoundError)
            return EXIT_NOT_FOUND if missing else EXIT_NOT_EXECUTABLE
        os.close(write_end)
        self.child = process.pid
        pump = LogPump(read_end, self.log)
        pump.start()
        orphaned = False
        while self.status is None:
            info = signal.sigtimedwait(SIGNALS, 1.0)
            if info is None:
                if os.getppid() != self.parent:
                    orphaned = True
                    break
            elif info.si_signo == signal.SIGCHLD:
                self.reap()
            else:
                orphaned = info.si_signo == PARENT_DIED
                break
        self.clean_up()
        pump.join(5.0)  # EOF once every holder of the pipe is gone
        if orphaned and self.run_dir is not None:  # no supervisor left to remove it
            shutil.rmtree(self.run_dir, ignore_errors=True)
        process.returncode = self.status  # reaped here, not by Popen
        return self.status if self.status is not None else 128 + signal.SIGTERM


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shim", exit_on_error=False)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--term-timeout", type=float, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument("argv", nargs="+")
    try:
        opts = parser.parse_args(args)
    except (argparse.ArgumentError, SystemExit):
        return EXIT_USAGE
    os.umask(0o077)
    # Block the signals we wait for before anything can deliver them (the child unblocks).
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        prctl(PR_SET_PDEATHSIG, PARENT_DIED)
        prctl(PR_SET_CHILD_SUBREAPER, 1)
    except OSError as exc:
        note(opts.log, f"prctl failed: {exc}")
        return EXIT_USAGE
    if os.getppid() != opts.parent:  # medserve died before PR_SET_PDEATHSIG took hold
        return 128 + signal.SIGTERM
    return Shim(opts.parent, opts.term_timeout, opts.log, opts.run_dir).run(opts.argv)


if __name__ == "__main__":
    set_name("medserve-shim")
    sys.exit(main())
