"""Every command's ``--help`` shows its texts whole.

Typer's default rich markup read ``[default: 127.0.0.1]`` or ``[auth] url`` in a help text
as a style tag and dropped it ("Bind address .", "(default:  url, else keys_path)"). Each
command's help is rendered here as a user sees it and checked: every option's and
argument's help text appears in full, and no line has the holes that dropped text leaves.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import typer

from medserve.cli import app

HOLES = [
    (re.compile(r"\s[.,;:](\s|$)"), "space before punctuation"),
    (re.compile(r"\(\s*\)|\[\s*\]"), "empty brackets"),
    (re.compile(r"\(\s|\s\)"), "space inside parentheses"),
]


def commands() -> Iterator[tuple[str, Any, Any]]:
    """(path, command, context) of every command and group, depth first."""
    root = typer.main.get_command(app)

    def walk(cmd: Any, name: str, parent: Any | None) -> Iterator[tuple[str, Any, Any]]:
        # Typer carries its own copy of click: its commands make their own contexts.
        ctx = cmd.context_class(cmd, info_name=name, parent=parent, terminal_width=80)
        yield name, cmd, ctx
        if hasattr(cmd, "list_commands"):
            for sub_name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, sub_name)
                assert sub is not None
                yield from walk(sub, sub_name, ctx)

    yield from walk(root, "medserve", None)


def flat(text: str) -> str:
    return " ".join(text.split())


ALL = list(commands())


def test_every_command_is_checked() -> None:
    names = {path for path, _, _ in ALL}
    assert {"serve", "keys", "list", "revoke", "audit", "verify", "migrate"} <= names


@pytest.mark.parametrize(("path", "cmd", "ctx"), ALL, ids=[p for p, _, _ in ALL])
def test_help_texts_are_shown_whole(path: str, cmd: Any, ctx: Any) -> None:
    shown = cmd.get_help(ctx)
    whole = flat(shown)
    for param in cmd.params:
        text = getattr(param, "help", None)
        if text:
            assert flat(text) in whole, f"{path} {param.name}: help cut in\n{shown}"
    if cmd.help:
        assert flat(cmd.help.split("\f")[0]) in whole, f"{path}: description cut in\n{shown}"
    for line in shown.splitlines():
        # Columns (option, description, "[default: ...]") are apart by 2+ spaces.
        for cell in re.split(r"\s{2,}", line.strip()):
            for pattern, what in HOLES:
                assert not pattern.search(cell), f"{path}: {what} in {line!r}\n{shown}"
    # (A group's list of commands shows each description cut short, by design.)
    own = flat(shown.split("\nCommands:")[0])
    for pair in ("()", "[]", "{}"):
        assert own.count(pair[0]) == own.count(pair[1]), f"{path}: unbalanced {pair}\n{shown}"
