"""The gateway benchmark's own arithmetic: CPU accounting over a process tree, CPU lists, and
the PASS/FAIL marks of the issue's targets (tests/bench/gateway.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.bench.gateway import Check
from tests.bench.gateway_peers import parse_cpus, tree_cpu_seconds

BURN_S = 0.3
BURN = f"import time\nwhile time.process_time() < {BURN_S}: pass\n"
# The child runs a grandchild that burns BURN_S of CPU; then both (live) or the child alone
# (reaped: the grandchild's CPU is now in the child's cutime) print "ready" and wait for
# stdin to close.
LIVE = f"import sys\n{BURN}print('ready', flush=True)\nsys.stdin.read()\n"
CHILD = {
    "live": f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {LIVE!r}])\n",
    "reaped": (
        f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {BURN!r}])\n"
        "print('ready', flush=True)\nsys.stdin.read()\n"
    ),
}


@pytest.mark.parametrize("case", sorted(CHILD))
def test_tree_cpu_counts_descendants(case: str) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", CHILD[case]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        try:
            assert child.stdout is not None and child.stdin is not None
            assert child.stdout.readline().strip() == "ready"  # bounded: it exits on failure
            assert tree_cpu_seconds(child.pid) >= BURN_S * 0.8
            child.stdin.close()
            assert child.wait(timeout=60) == 0
        finally:
            child.kill()


def test_tree_cpu_of_a_missing_process() -> None:
    script = "import os; print(os.getpid())"
    done = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True
    )
    with pytest.raises(FileNotFoundError):
        tree_cpu_seconds(int(done.stdout))


@pytest.mark.parametrize(
    ("text", "cpus"), [("0", {0}), ("1", {1}), ("0,2-3", {0, 2, 3}), ("4-4", {4})]
)
def test_parse_cpus(text: str, cpus: set[int]) -> None:
    assert parse_cpus(text) == cpus


@pytest.mark.parametrize("text", ["", "a", "0,,1"])
def test_parse_cpus_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cpus(text)


@pytest.mark.parametrize(
    ("value", "limit", "at_most", "floor", "mark"),
    [
        (0.8, 1.0, True, None, "PASS"),
        (1.0, 1.0, True, None, "PASS"),
        (1.2, 1.0, True, None, "FAIL"),
        (3.1, 3.0, False, None, "PASS"),
        (2.9, 3.0, False, None, "FAIL"),
        (1.0, 1.05, True, 0.95, "PASS"),
        (0.2, 1.05, True, 0.95, "FAIL"),  # tokens in clumps
        (None, 1.0, True, None, "SKIP"),
    ],
)
def test_check_marks(
    value: float | None, limit: float, at_most: bool, floor: float | None, mark: str
) -> None:
    check = Check("x", value, limit, at_most, "x", floor=floor)
    assert check.mark == mark
    assert check.line().startswith(f"[{mark}] x: ")
