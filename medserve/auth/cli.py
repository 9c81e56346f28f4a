"""``medserve keys``: create, list and revoke API keys in the keys database.

The secret is printed once, at creation, and never stored. A running server sees a new or
revoked key on its next request (SQLite) or within ``[auth] stale_after_s`` (PostgreSQL,
every gateway), and copies the change into its audit log.

The database is ``--db`` (a SQLite path or a ``postgresql://`` connection string), else
``[auth] url``, else ``[auth] keys_path``. A password on the command line shows in the
process list: prefer ``PGPASSWORD``/``~/.pgpass`` or ``MEDSERVE_AUTH__URL``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from medserve.auth.keys import ROLES, KeyBackend, KeyStoreError, Role, open_keys, parse_expiry
from medserve.config import load_settings
from medserve.console import ConfigOpt, fail, os_fail
from medserve.errors import ConfigError
from medserve.pgsql import is_postgres_url

app = typer.Typer(help="API keys: who may ask what.", no_args_is_help=True)


DbOpt = Annotated[
    str | None,
    typer.Option(
        "--db",
        help="Keys database: a SQLite file or postgresql://user@host/db (default: [auth] "
        "url, else keys_path).",
    ),
]


def _store(config: Path | None, db: str | None = None) -> KeyBackend:
    try:
        target = db if db is not None else load_settings(config).auth.keys_target()
    except ConfigError as exc:
        raise fail(str(exc)) from None
    if not (isinstance(target, str) and is_postgres_url(target)):
        _check_file(Path(target))
    return open_keys(target)


def _check_file(path: Path) -> None:
    """A SQLite keys database this user cannot open (every command writes: the schema, WAL)
    fails the command with one line naming it, not with SQLite's "unable to open database
    file" traceback. A missing file is created by the store."""
    try:
        if path.exists():
            with path.open("r+b"):
                pass
    except OSError as exc:
        raise os_fail(exc, "keys database", path) from None


@app.command("create")
def create(
    name: Annotated[str, typer.Option(help="Who or what uses the key, e.g. discharge-app.")],
    models: Annotated[str, typer.Option(help="Comma-separated model ids, or * for all.")] = "*",
    role: Annotated[str, typer.Option(help="user, admin or auditor.")] = "user",
    rpm: Annotated[int | None, typer.Option(min=1, help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option(min=1, help="Tokens per minute.")] = None,
    expires: Annotated[str | None, typer.Option(help="Expiry date (ISO 8601, UTC).")] = None,
    fallback: Annotated[
        bool,
        typer.Option(
            "--fallback/--no-fallback",
            help="Whether a model's fallback engines (other weights of the same checkpoint, "
            "e.g. the CPU GGUF of a GPU model) may answer; --no-fallback gets the replicas' "
            "503 instead.",
        ),
    ] = True,
    config: ConfigOpt = None,
    db: DbOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Create a key and print its secret, once."""
    if role not in ROLES:
        raise fail(f"--role must be one of {', '.join(ROLES)}")
    scope = [m.strip() for m in models.split(",") if m.strip()] or ["*"]
    try:
        until = parse_expiry(expires) if expires else None
    except ValueError:
        raise fail("--expires must be an ISO 8601 date, e.g. 2027-06-30") from None
    chosen: Role = next(r for r in ROLES if r == role)
    try:
        key, token = _store(config, db).create(name, chosen, scope, rpm, tpm, until, fallback)
    except KeyStoreError as exc:
        raise fail(str(exc)) from None
    if as_json:
        sys.stdout.write(json.dumps({**key.as_dict(), "key": token}) + "\n")
        return
    out = Console()
    policy = "" if key.fallback else ", no fallback"
    out.print(
        f"created key [bold]{key.id}[/] ({key.name}, role {key.role}{policy})", highlight=False
    )
    out.print("secret, shown once — store it in the application's secret store:")
    out.print(token, highlight=False, soft_wrap=True)


@app.command("list")
def list_keys(
    config: ConfigOpt = None,
    db: DbOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """List keys (never their secrets)."""
    try:
        keys = _store(config, db).all()
    except KeyStoreError as exc:
        raise fail(str(exc)) from None
    if as_json:
        sys.stdout.write(json.dumps([k.as_dict() for k in keys], indent=2) + "\n")
        return
    table = Table("id", "name", "role", "models", "rpm", "tpm", "expires", "fallback", "state")
    for k in keys:
        state = "revoked" if k.revoked else "expired" if k.expired() else "active"
        table.add_row(
            k.id,
            k.name,
            k.role,
            ",".join(k.models),
            str(k.rpm or "-"),
            str(k.tpm or "-"),
            k.expires or "-",
            "yes" if k.fallback else "no",
            state,
        )
    Console().print(table)


@app.command("revoke")
def revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id.")],
    config: ConfigOpt = None,
    db: DbOpt = None,
) -> None:
    """Revoke a key: refused from the next request on (PostgreSQL: on every gateway
    within [auth] stale_after_s)."""
    try:
        key = _store(config, db).revoke(key_id)
    except KeyStoreError as exc:
        raise fail(str(exc)) from None
    Console().print(f"revoked key {key.id} ({key.name})", highlight=False)


@app.command("migrate")
def migrate_command(db: DbOpt = None, config: ConfigOpt = None) -> None:
    """Apply the PostgreSQL keys schema's pending migrations and grants (as the owner
    role: a gateway's role may not change the schema). Roles: [audit] gateway_role and
    auditor_role."""
    from medserve import pgsql
    from medserve.auth.pgkeys import MIGRATIONS, PgKeyStore, require_driver

    try:
        settings = load_settings(config)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    url = db if db is not None else settings.auth.keys_target()
    if not isinstance(url, str) or not pgsql.is_postgres_url(url):
        raise fail("migrate is for keys in PostgreSQL: --db postgresql://... or [auth] url")
    roles = (settings.audit.gateway_role, settings.audit.auditor_role)
    store = PgKeyStore(url, gateway_role=roles[0], auditor_role=roles[1])
    try:
        require_driver()
        with pgsql.connect(url, autocommit=True) as conn:
            store.migrate(conn)
    except (pgsql.DatabaseError, KeyStoreError) as exc:
        raise fail(str(exc)) from None
    Console().print(
        f"keys schema at version {len(MIGRATIONS)} in {pgsql.redact(url)}; granted "
        f"{roles[0]} read + its own rows, {roles[1]} read (those that exist)",
        highlight=False,
    )
