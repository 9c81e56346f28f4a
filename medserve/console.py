"""What every ``medserve`` command shares: the error console, the --config option, failing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

err = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML settings file.", exists=False)
]


def typer_app(**options: Any) -> typer.Typer:
    """A ``typer.Typer`` whose help is plain text: every ``medserve`` command group is one.

    Typer's default ("rich" markup) reads ``[...]`` in a help text as a style tag and drops
    it, so ``[default: 127.0.0.1]`` or ``[auth] url`` vanished from ``--help``; with no
    markup, click formats the text as written (tests/unit/test_help.py checks every
    command's help)."""
    return typer.Typer(rich_markup_mode=None, **options)


def fail(message: str) -> typer.Exit:
    """Print ``message`` as an error; the caller raises the returned exit (status 2)."""
    # Escaped: messages name paths and options such as `medserve[quant]`, not markup.
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(2)
