"""What every ``medserve`` command shares: the error console, the --config option, failing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

err = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML settings file.", exists=False)
]


def fail(message: str) -> typer.Exit:
    """Print ``message`` as an error; the caller raises the returned exit (status 2)."""
    # Escaped: messages name paths and options such as `medserve[quant]`, not markup.
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(2)
