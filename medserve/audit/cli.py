"""``medserve audit``: verify, export, tail and checkpoints, reading the log directly: the
SQLite file, or the PostgreSQL database (``--db postgresql://...`` or ``audit.url``; the
auditor role, SELECT only, is enough for everything but ``migrate``, which the owner role
runs). A database password never appears in what these commands print.

Reading audit data is a privilege of its own (an auditor role arrives with API keys); these
commands need file access to the log, which the server's operators grant deliberately.
Exit codes: 0 intact / done, 1 damage found, 2 unusable arguments or files.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import SecretStr
from rich.console import Console

from medserve import pgsql
from medserve.audit import export as exporting
from medserve.audit.keys import (
    AuditKeyError,
    ChainKeys,
    ContentCipher,
    key_fingerprint,
    load_or_create_secret,
    load_or_create_signing_key,
    load_public_key,
    signing_key_paths,
)
from medserve.audit.record import chat_input, chat_message, parse_time
from medserve.audit.store import connect, read_checkpoints
from medserve.audit.verify import load_checkpoint_file, verify
from medserve.config import AuditSettings, load_settings
from medserve.console import (
    AllowMissingRolesOpt,
    ConfigOpt,
    check_roles,
    err,
    fail,
    os_fail,
    report_migration,
    typer_app,
)
from medserve.errors import ConfigError

RECONNECT_S = 60.0  # how long `tail --follow` keeps reconnecting to a database that went away

app = typer_app(help="Verify and read the tamper-evident audit log.", no_args_is_help=True)

DbOpt = Annotated[
    str | None,
    typer.Option(
        "--db",
        help="Audit log file, or a postgresql:// URL (prefer audit.url / MEDSERVE_AUDIT__URL "
        "or a libpq password file: a command line is visible to other users) "
        "[default: from settings].",
    ),
]


def _conf(config: Path | None) -> AuditSettings:
    try:
        return load_settings(config).audit
    except ConfigError as exc:
        raise fail(str(exc)) from None


def _settings(config: Path | None, db: str | None) -> AuditSettings:
    """The audit settings, pointed at ``db`` (a file or a postgresql:// URL) if given; a
    SQLite log must exist."""
    conf = _conf(config)
    if db is not None and pgsql.is_postgres_url(db):
        conf = conf.model_copy(update={"url": SecretStr(db)})
    elif db is not None:
        conf = conf.model_copy(update={"path": Path(db), "url": None})
    if conf.url is None:
        try:
            if not conf.path.is_file():
                raise fail(f"no audit log at {conf.path}")
            with conf.path.open("rb"):  # readable by this user (SQLite would only say
                pass  # "unable to open database file")
        except OSError as exc:
            raise os_fail(exc, "audit log", conf.path) from None
    return conf


def _secret(path: Path, what: str) -> bytes:
    """A key that must already exist: reading the log never creates keys. A file that is
    missing or unreadable fails the command (status 2) with one line naming it."""
    try:
        if not path.is_file():
            raise fail(f"the {what} {path} does not exist")
        with path.open("rb"):
            pass
    except OSError as exc:
        raise os_fail(exc, what, path) from None
    try:
        return load_or_create_secret(path, what)
    except AuditKeyError as exc:
        raise fail(str(exc)) from None


@app.command("verify")
def verify_command(
    db: DbOpt = None,
    config: ConfigOpt = None,
    key: Annotated[Path | None, typer.Option(help="Audit secret [default: from settings].")] = None,
    checkpoints: Annotated[
        Path | None, typer.Option(help="Checkpoints kept elsewhere (JSON lines) to check too.")
    ] = None,
    public_key: Annotated[
        Path | None, typer.Option(help="Checkpoint public key [default: beside the signing key].")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Check every record, the chain and the signed checkpoints. Exit 1 on damage."""
    conf = _settings(config, db)
    keys = ChainKeys.from_secret(_secret(key or conf.key_path(), "audit secret"))
    pub_path = public_key or signing_key_paths(conf.signing_key_path())[1]
    try:
        pub = load_public_key(pub_path) if public_key or pub_path.is_file() else None
    except AuditKeyError as exc:
        raise fail(str(exc)) from None
    except OSError as exc:  # the default's directory cannot be searched
        raise os_fail(exc, "public key", pub_path) from None
    try:
        external = load_checkpoint_file(checkpoints) if checkpoints else []
    except OSError as exc:
        raise os_fail(exc, "checkpoints file", str(checkpoints)) from None
    except ValueError:
        raise fail(f"the checkpoints file {checkpoints} is not JSON lines") from None
    if conf.url is not None:
        from medserve.audit import pgverify

        try:
            result = pgverify.verify(conf.url.get_secret_value(), keys, pub, external)
        except pgsql.DatabaseError as exc:
            raise fail(str(exc)) from None
    else:
        result = verify(conf.path, keys, pub, external)
    if as_json:
        sys.stdout.write(json.dumps(result.as_dict(), indent=2) + "\n")
    elif result.problem is None:
        where = f"{result.instances} instance chains" if conf.url else f"last seq {result.last_seq}"
        Console().print(
            f"[green]intact[/]: {result.records} records ({where}), "
            f"{result.checkpoints} signed checkpoints verified",
            highlight=False,
        )
    else:
        p = result.problem
        chain = f"instance {p.instance!r}, " if p.instance is not None else ""
        Console().print(
            f"[bold red]damaged[/]: {chain}first bad seq {p.seq}: {p.kind} ({p.detail}); "
            f"{result.records} records verified before it",
            highlight=False,
        )
    for note in result.notes:
        err.print(f"note: {note}", highlight=False)
    raise typer.Exit(0 if result.ok else 1)


@app.command("export")
def export_command(
    db: DbOpt = None,
    config: ConfigOpt = None,
    since: Annotated[
        str | None, typer.Option(help="From this time (ISO 8601, UTC if no zone).")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Before this time (ISO 8601).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="jsonl or csv.")] = "jsonl",
    out: Annotated[Path | None, typer.Option(help="Write here instead of stdout.")] = None,
    content_key: Annotated[
        Path | None, typer.Option(help="Decrypt captured content with this key.")
    ] = None,
) -> None:
    """Write the records of a time range as JSON lines or CSV."""
    if fmt not in ("jsonl", "csv"):
        raise fail("--format must be jsonl or csv")
    conf = _settings(config, db)
    try:
        start = parse_time(since) if since else None
        end = parse_time(until) if until else None
    except ValueError:
        raise fail("--since/--until must be ISO 8601 times, e.g. 2026-11-25T08:00") from None
    cipher = ContentCipher(_secret(content_key, "content key")) if content_key else None
    if conf.url is not None:
        _pg_export(conf.url.get_secret_value(), start, end, cipher, fmt, out)
        return
    conn = connect(conf.path, readonly=True)
    try:
        items = exporting.records(conn, since=start, until=end, cipher=cipher)
        if out is None:
            n = exporting.write(items, sys.stdout, fmt)
        else:
            with out.open("w", encoding="utf-8", newline="") as f:
                n = exporting.write(items, f, fmt)
    except OSError as exc:
        raise os_fail(exc, "output file", str(out)) from None
    finally:
        conn.close()
    err.print(f"{n} records", highlight=False)


@app.command("tail")
def tail_command(
    db: DbOpt = None,
    config: ConfigOpt = None,
    lines: Annotated[int, typer.Option("-n", "--lines", min=0, help="Show the last N.")] = 10,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new ones.")] = False,
) -> None:
    """Print the last records as JSON lines (and, with --follow, new ones as they come)."""
    conf = _settings(config, db)
    if conf.url is not None:
        _pg_tail(conf.url.get_secret_value(), lines, follow)
        return
    conn = connect(conf.path, readonly=True)
    try:
        after = max(0, exporting.last_seq(conn) - lines)
        while True:
            for item in exporting.records(conn, after_seq=after):
                sys.stdout.write(json.dumps(item, sort_keys=True, ensure_ascii=False) + "\n")
                after = item["seq"]
            sys.stdout.flush()
            if not follow:
                return
            time.sleep(1.0)
    except KeyboardInterrupt:
        return
    finally:
        conn.close()


@app.command("keygen")
def keygen_command(
    config: ConfigOpt = None,
    key: Annotated[Path | None, typer.Option(help="Audit secret [default: from settings].")] = None,
    signing_key: Annotated[
        Path | None, typer.Option(help="Checkpoint signing key [default: from settings].")
    ] = None,
    content_key: Annotated[
        Path | None, typer.Option(help="Also a content-capture key, here.")
    ] = None,
) -> None:
    """Create the audit keys that do not exist yet (mode 0600); never overwrites one."""
    conf = _conf(config)
    out = Console()
    wanted: list[tuple[Path, str]] = [
        (key or conf.key_path(), "audit secret"),
        (signing_key or conf.signing_key_path(), "signing key"),
    ]
    content = content_key or (conf.capture_key_file if conf.capture else None)
    if content is not None:
        wanted.append((content, "content key"))
    for path, what in wanted:
        try:
            existed = path.exists()
            if what == "signing key":
                pub = key_fingerprint(load_or_create_signing_key(path).public_key())
                what = f"signing key (public key {path.with_suffix('.pub')}, id {pub})"
            else:
                load_or_create_secret(path, what)
        except AuditKeyError as exc:
            raise fail(str(exc)) from None
        except OSError as exc:
            raise os_fail(exc, what, path) from None
        out.print(f"{'kept' if existed else 'created'} {what}: {path}", highlight=False)


@app.command("hash")
def hash_command(
    file: Annotated[Path, typer.Argument(help="The text, or with --chat a JSON messages list.")],
    chat: Annotated[
        bool, typer.Option(help='FILE holds chat messages: [{"role": ..., "content": ...}].')
    ] = False,
    config: ConfigOpt = None,
    key: Annotated[Path | None, typer.Option(help="Audit secret [default: from settings].")] = None,
) -> None:
    """Print the keyed hash the log would hold for a prompt, a completion or a `user`.

    Look for it in the prompt_hmac / completion_hmac / user_hmac of an export to find who
    sent a text. FILE holds the exact text (for a `user`, without a trailing newline).
    """
    conf = _conf(config)
    keys = ChainKeys.from_secret(_secret(key or conf.key_path(), "audit secret"))
    try:
        data = file.read_bytes()
        if chat:
            messages = json.loads(data)
            data = chat_input([_chat_message(m) for m in messages])
    except OSError as exc:
        raise os_fail(exc, "file", file) from None
    except (ValueError, TypeError, KeyError):
        raise fail(f'{file} is not a JSON list of {{"role", "content"}} messages') from None
    sys.stdout.write(keys.text_hmac(data) + "\n")


def _chat_message(m: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI message as the server hashes it (``developer`` is ``system`` there)."""
    calls = [
        (str(c["id"]), str(c["function"]["name"]), str(c["function"]["arguments"]))
        for c in m.get("tool_calls") or ()
    ]
    role = "system" if m["role"] == "developer" else str(m["role"])
    content = m["content"]
    if isinstance(content, list):  # text parts, joined as the server joins them
        content = "".join(str(part["text"]) for part in content)
    call_id = m.get("tool_call_id")
    return chat_message(role, "" if content is None else str(content), calls, call_id)


@app.command("checkpoints")
def checkpoints_command(
    db: DbOpt = None,
    config: ConfigOpt = None,
    out: Annotated[Path | None, typer.Option(help="Write here instead of stdout.")] = None,
) -> None:
    """Export the signed checkpoints (JSON lines) to keep them away from the log."""
    conf = _settings(config, db)
    if conf.url is not None:
        lines = _pg_read(conf.url.get_secret_value(), _pg_checkpoints)
    else:
        conn = connect(conf.path, readonly=True)
        try:
            lines = read_checkpoints(conn)
        finally:
            conn.close()
    text = "".join(json.dumps(c, sort_keys=True) + "\n" for c in lines)
    if out is None:
        sys.stdout.write(text)
    else:
        try:
            out.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise os_fail(exc, "output file", out) from None


@app.command("migrate")
def migrate_command(
    db: DbOpt = None,
    config: ConfigOpt = None,
    allow_missing_roles: AllowMissingRolesOpt = False,
) -> None:
    """Apply the PostgreSQL audit schema's pending migrations and grants (as the owner role:
    the gateways' own role may not change the schema). Roles: [audit] gateway_role and
    auditor_role; says what was granted to whom, and fails on a role that does not exist."""
    from medserve.audit.pgstore import MIGRATE_HINT, open_schema

    conf = _settings(config, db)
    if conf.url is None:
        raise fail("migrate is for a PostgreSQL audit log: --db postgresql://... or audit.url")
    url = conf.url.get_secret_value()
    roles = {conf.gateway_role: "[audit] gateway_role", conf.auditor_role: "[audit] auditor_role"}
    granted = pgsql.Granted()
    try:
        with pgsql.connect(url, autocommit=True) as conn:
            check_roles(pgsql.missing_roles(conn, list(roles)), roles, allow_missing_roles)
            version = open_schema(
                conn,
                url,
                gateway_role=conf.gateway_role,
                auditor_role=conf.auditor_role,
                granted=granted,
            )
    except pgsql.DatabaseError as exc:
        raise fail(str(exc)) from None
    report_migration("audit", version, pgsql.redact(url), granted, MIGRATE_HINT)


def _pg_read(url: str, read: Any) -> Any:
    """``read(conn)`` on a read-only connection; a database error fails the command with a
    message that holds no password."""
    import psycopg

    try:
        with pgsql.connect(url) as conn:
            conn.read_only = True
            return read(conn)
    except pgsql.DatabaseError as exc:
        raise fail(str(exc)) from None
    except psycopg.Error as exc:
        raise fail(
            f"cannot read the audit log in {pgsql.redact(url)}: {pgsql.scrub(str(exc), url)}"
        ) from None


def _pg_checkpoints(conn: Any) -> list[dict[str, Any]]:
    from medserve.audit.pgstore import read_checkpoints as pg_read_checkpoints

    return pg_read_checkpoints(conn)


def _pg_export(
    url: str,
    since: str | None,
    until: str | None,
    cipher: ContentCipher | None,
    fmt: str,
    out: Path | None,
) -> None:
    def run(conn: Any) -> int:
        items = exporting.pg_records(conn, since=since, until=until, cipher=cipher)
        columns = exporting.PG_CSV_COLUMNS
        if out is None:
            return exporting.write(items, sys.stdout, fmt, columns)
        try:
            with out.open("w", encoding="utf-8", newline="") as f:
                return exporting.write(items, f, fmt, columns)
        except OSError as exc:
            raise os_fail(exc, "output file", out) from None

    n = _pg_read(url, run)
    err.print(f"{n} records", highlight=False)


def _pg_tail(url: str, lines: int, follow: bool) -> None:
    """The last ``lines`` records of every chain, then (``follow``) what each chain adds,
    once a second. A connection lost while following (the database restarted) is made
    again, and the chains continue from the heads already printed (nothing twice, nothing
    missed); the command fails only when the database stays away :data:`RECONNECT_S`."""
    import psycopg

    heads: dict[str, int] | None = None
    lost_at: float | None = None

    def run(conn: Any) -> None:
        nonlocal heads, lost_at
        # One snapshot for the last lines and the heads; then, per round, what each chain
        # added above its head (a time-ordered cursor would miss a record that a slower
        # gateway commits with an earlier time than one already printed).
        if heads is None:
            heads = exporting.pg_heads(conn)
            items = exporting.pg_records(conn, after=exporting.pg_tail_start(conn, lines))
        else:
            items = exporting.pg_records(conn, above=dict(heads))
        lost_at = None
        while True:
            for item in items:
                sys.stdout.write(json.dumps(item, sort_keys=True, ensure_ascii=False) + "\n")
                chain = str(item["instance_chain"])
                heads[chain] = max(heads.get(chain, 0), int(item["seq"]))
            sys.stdout.flush()
            conn.rollback()  # a new snapshot for the next round
            if not follow:
                return
            time.sleep(1.0)
            items = exporting.pg_records(conn, above=dict(heads))

    while True:
        try:
            with pgsql.connect(url) as conn:
                conn.read_only = True
                run(conn)
                return
        except KeyboardInterrupt:
            return
        except (pgsql.DatabaseError, psycopg.OperationalError) as exc:
            if not follow or heads is None:
                reason = str(exc) if isinstance(exc, pgsql.DatabaseError) else None
                raise fail(
                    reason
                    or f"cannot read the audit log in {pgsql.redact(url)}: "
                    f"{pgsql.scrub(str(exc), url)}"
                ) from None
            if lost_at is None:
                lost_at = time.monotonic()
                err.print("the audit database connection was lost; reconnecting", highlight=False)
            elif time.monotonic() - lost_at > RECONNECT_S:
                raise fail(f"the audit log in {pgsql.redact(url)} stayed unreachable") from None
            time.sleep(1.0)
        except psycopg.Error as exc:
            raise fail(
                f"cannot read the audit log in {pgsql.redact(url)}: {pgsql.scrub(str(exc), url)}"
            ) from None
