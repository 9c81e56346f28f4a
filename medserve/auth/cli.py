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
from rich.markup import escape
from rich.table import Column, Table

from medserve.auth.keys import ROLES, Key, KeyBackend, KeyStoreError, Role, open_keys, parse_expiry
from medserve.config import load_settings
from medserve.console import (
    AllowMissingRolesOpt,
    ConfigOpt,
    check_roles,
    fail,
    os_fail,
    report_migration,
    typer_app,
)
from medserve.errors import ConfigError
from medserve.pgsql import is_postgres_url

app = typer_app(help="API keys: who may ask what.", no_args_is_help=True)


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
        f"created key [bold]{key.id}[/] ({escape(key.name)}, role {key.role}{policy})",
        highlight=False,
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
    rows = [
        (
            k.id,
            escape(k.name),
            k.role,
            escape(",".join(k.models)),
            str(k.rpm or "-"),
            str(k.tpm or "-"),
            k.expires or "-",
            "yes" if k.fallback else "no",
            "revoked" if k.revoked else "expired" if k.expired() else "active",
        )
        for k in keys
    ]
    # The id is what `revoke` takes: never cut or wrapped, whatever the terminal's width;
    # nor are the short columns; names, model lists and expiry times wrap (never cut).
    headers = ("id", "name", "role", "models", "rpm", "tpm", "expires", "fallback", "state")
    columns = []
    for i, header in enumerate(headers):
        if header in ("name", "models", "expires"):
            columns.append(Column(header, overflow="fold"))
        else:
            widest = max([len(header), *(len(row[i]) for row in rows)])
            columns.append(Column(header, no_wrap=True, min_width=widest, overflow="ignore"))
    table = Table(*columns, show_edge=False)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


PREFIX_MIN = 4  # shortest id prefix `revoke` accepts (ids are 12 hex digits)


@app.command("revoke")
def revoke(
    key_id: Annotated[
        str, typer.Argument(help="The key's id, or a prefix of it that no other key's id has.")
    ],
    config: ConfigOpt = None,
    db: DbOpt = None,
) -> None:
    """Revoke a key: refused from the next request on (PostgreSQL: on every gateway
    within [auth] stale_after_s)."""
    try:
        store = _store(config, db)
        key = store.revoke(resolve(store.all(), key_id))
    except KeyStoreError as exc:
        raise fail(str(exc)) from None
    Console().print(f"revoked key {key.id} ({escape(key.name)})", highlight=False)


def resolve(keys: list[Key], given: str) -> str:
    """The id ``given`` names: an id itself, or a prefix of exactly one key's id (at least
    :data:`PREFIX_MIN` characters; a trailing "…" copied from a cut display is dropped).
    A prefix is accepted because ids are long and were shown cut; an ambiguous one is
    refused naming the candidates, so a revocation never hits another key. Raises
    :class:`KeyStoreError`; an id that matches nothing is returned as given (the store
    says there is no such key)."""
    wanted = given.strip().rstrip("…")
    if any(k.id == wanted for k in keys):
        return wanted
    matches = sorted(k.id for k in keys if k.id.startswith(wanted))
    if len(matches) > 1:
        raise KeyStoreError(
            f"{wanted!r} is the start of {len(matches)} keys' ids ({', '.join(matches)}): "
            "give more of it"
        )
    if len(matches) == 1 and len(wanted) >= PREFIX_MIN:
        return matches[0]
    if matches:
        raise KeyStoreError(f"give at least {PREFIX_MIN} characters of the key's id")
    return wanted


@app.command("migrate")
def migrate_command(
    db: DbOpt = None,
    config: ConfigOpt = None,
    allow_missing_roles: AllowMissingRolesOpt = False,
) -> None:
    """Apply the PostgreSQL keys schema's pending migrations and grants (as the owner
    role: a gateway's role may not change the schema). Roles: [audit] gateway_role and
    auditor_role; says what was granted to whom, and fails on a role that does not exist."""
    from medserve import pgsql
    from medserve.auth.pgkeys import MIGRATE_HINT, PgKeyStore, require_driver

    try:
        settings = load_settings(config)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    url = db if db is not None else settings.auth.keys_target()
    if not isinstance(url, str) or not pgsql.is_postgres_url(url):
        raise fail("migrate is for keys in PostgreSQL: --db postgresql://... or [auth] url")
    gateway, auditor = settings.audit.gateway_role, settings.audit.auditor_role
    roles = {gateway: "[audit] gateway_role", auditor: "[audit] auditor_role"}
    store = PgKeyStore(url, gateway_role=gateway, auditor_role=auditor)
    granted = pgsql.Granted()
    try:
        require_driver()
        with pgsql.connect(url, autocommit=True) as conn:
            check_roles(pgsql.missing_roles(conn, list(roles)), roles, allow_missing_roles)
            version = store.migrate(conn, granted)
    except (pgsql.DatabaseError, KeyStoreError) as exc:
        raise fail(str(exc)) from None
    report_migration("keys", version, pgsql.redact(url), granted, MIGRATE_HINT)
