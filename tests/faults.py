"""Real file-system faults for the audit log's tests: read-only files and directories.

Root ignores permission bits, so for root (the CI container, this sandbox) "read-only" is
the immutable attribute (``chattr +i``), which root cannot write through either; an
ordinary user gets ``chmod``. Where neither works (no ``chattr``, a file system without the
attribute) the test is skipped rather than run against a fault that is not there.

Never make a -shm file immutable: SQLite maps it into memory, and a write to an immutable
mapping kills the process with SIGBUS.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest


def _chattr(flag: str, path: Path) -> bool:
    tool = shutil.which("chattr")
    if tool is None:
        return False
    done = subprocess.run([tool, flag, str(path)], capture_output=True, timeout=30)
    return done.returncode == 0


@contextmanager
def read_only(*paths: Path) -> Iterator[None]:
    """Make each of ``paths`` (files or directories) unwritable for this process; undo on
    exit. A read-only directory still lets its existing files be written, like chmod."""
    with ExitStack() as undo:
        for path in paths:
            if os.geteuid() == 0:
                if not _chattr("+i", path):
                    pytest.skip("root cannot make files read-only here (no chattr +i)")
                undo.callback(_chattr, "-i", path)
            else:
                mode = stat.S_IMODE(path.stat().st_mode)
                path.chmod(mode & ~0o222)
                undo.callback(path.chmod, mode)
        yield
