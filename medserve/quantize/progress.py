"""Progress of the quantization stages: rich bars on a terminal, nothing under ``--json``.

Stages call ``stage(name, total)`` and ``advance()``; they never touch rich themselves, so
the pipeline runs the same in tests, under ``--json`` and on a terminal.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)


class Stage(Protocol):
    def advance(self, steps: int = 1) -> None: ...

    def note(self, text: str) -> None:
        """Replace the stage's description suffix (a layer name, a file type)."""
        ...


class Reporter(Protocol):
    seconds: dict[str, float]

    def stage(self, name: str, total: int | None = None) -> AbstractContextManager[Stage]: ...


class _NullStage:
    def advance(self, steps: int = 1) -> None:
        pass

    def note(self, text: str) -> None:
        pass


class Quiet:
    """No output; still records how long each stage took."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator[Stage]:
        began = time.perf_counter()
        try:
            yield _NullStage()
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - began


class _RichStage:
    def __init__(self, progress: Progress, task: TaskID, name: str) -> None:
        self._progress = progress
        self._task = task
        self._name = name

    def advance(self, steps: int = 1) -> None:
        self._progress.advance(self._task, steps)

    def note(self, text: str) -> None:
        self._progress.update(self._task, description=f"{self._name} [dim]{text}[/]")


class Bars(Quiet):
    """One rich progress bar per stage on ``console`` (stderr), kept once finished."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self._progress = Progress(
            SpinnerColumn(finished_text="[green]done[/]"),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )

    def __enter__(self) -> Bars:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    @contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator[Stage]:
        task = self._progress.add_task(name, total=total)
        began = time.perf_counter()
        try:
            yield _RichStage(self._progress, task, name)
            # Stages without a known size (or that did less) show as one finished step.
            end = total or max(self._progress.tasks[task].completed, 1)
            self._progress.update(task, total=end, completed=end)
        finally:
            self._progress.stop_task(task)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - began
