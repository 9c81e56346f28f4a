"""What every ``medserve`` command shares: the error console, the --config option, failing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from medserve.errors import unusable_file

err = Console(stderr=True)

# MEDSERVE_CONFIG names the file when --config is not given: the image sets it, so that a
# server and the admin commands exec'd beside it read the same file (file < MEDSERVE_* env
# < flags, medserve.config.load_settings).
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        envvar="MEDSERVE_CONFIG",
        help="TOML settings file [env: MEDSERVE_CONFIG].",
        show_envvar=False,
        exists=False,
    ),
]


def fail(message: str) -> typer.Exit:
    """Print ``message`` as an error; the caller raises the returned exit (status 2)."""
    # Escaped: messages name paths and options such as `medserve[quant]`, not markup.
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(2)


def os_fail(exc: OSError, what: str, path: Path | str) -> typer.Exit:
    """Fail (status 2) on a file the user named that cannot be used: one line naming
    ``what`` and ``path``, the system's reason and the fix; no traceback."""
    return fail(unusable_file(exc, what, path))
