"""What every ``medserve`` command shares: the error console, the --config option, failing."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from medserve.errors import unusable_file

if TYPE_CHECKING:
    from medserve.pgsql import Granted

err = Console(stderr=True)

AllowMissingRolesOpt = Annotated[
    bool,
    typer.Option(
        "--allow-missing-roles",
        help="Grant to the configured roles that exist and go on without the others "
        "(default: a configured role that does not exist is an error: most likely a typo).",
    ),
]


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
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


def check_roles(missing: list[str], roles: dict[str, str], allow_missing: bool) -> None:
    """Fail (exit 2) naming each configured role that does not exist, before anything is
    migrated, unless ``allow_missing`` (then warn). ``roles``: role -> its setting's name."""
    if not missing:
        return
    named = ", ".join(f"{r} ({roles.get(r, 'role')})" for r in missing)
    if allow_missing:
        err.print(
            f"warning: no such role: {escape(named)}: nothing granted to it",
            highlight=False,
            soft_wrap=True,
        )
        return
    raise fail(
        f"no such role in the database: {named}; nothing was migrated or granted. Create "
        "the role, correct the setting, or pass --allow-missing-roles to grant only to the "
        "roles that exist"
    )


def report_migration(what: str, version: int, where: str, granted: Granted, hint: str) -> None:
    """Say what a ``migrate`` command did, and only that: the schema's version, each grant
    made, the roles that got nothing; fail (exit 2) when this role could not grant at all
    (``hint``: how to run it as the owner)."""
    out = Console()
    out.print(
        f"{what} schema at version {version} in {escape(where)}", highlight=False, soft_wrap=True
    )
    for line in granted.lines:
        out.print(f"granted {escape(line)}", highlight=False, soft_wrap=True)
    for role in sorted(granted.missing):
        err.print(
            f"warning: not granted: role {escape(role)} does not exist",
            highlight=False,
            soft_wrap=True,
        )
    if granted.refused:
        raise fail(
            f"nothing granted: the role this command logs in as may not grant on the {what} "
            f"tables (it does not own them): {hint}"
        )


def os_fail(exc: OSError, what: str, path: Path | str) -> typer.Exit:
    """Fail (status 2) on a file the user named that cannot be used: one line naming
    ``what`` and ``path``, the system's reason and the fix; no traceback."""
    return fail(unusable_file(exc, what, path))
