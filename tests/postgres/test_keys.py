"""API keys in PostgreSQL (medserve.auth.pgkeys) on the throwaway server of tests/pg.py:
the store's operations, its cached lookups and their revocation bound, the schema
versioning, `medserve keys --db` and `medserve doctor`, and a password that never shows."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from medserve.auth import Authenticator
from medserve.auth.keys import KeyStoreError
from medserve.auth.pgkeys import SCHEMA_VERSION, PgKeyStore
from medserve.config import AuthSettings, Settings
from medserve.doctor import checks
from medserve.errors import AuthenticationError, UnavailableError
from tests import pg
from tests.conftest import ROOT

psycopg = pytest.importorskip("psycopg", reason="the postgres extra (psycopg) is not installed")

# A password no message has any other reason to contain.
SECRET_PASSWORD = "Zq9-distinctive-PW-7731"


@pytest.fixture
def gateways() -> Iterator[Callable[..., PgKeyStore]]:
    """Makes gateway-side stores (they keep a connection for refreshes), closed after."""
    made: list[PgKeyStore] = []

    def make(url: str, **options: Any) -> PgKeyStore:
        made.append(PgKeyStore(url, **options))
        return made[-1]

    yield make
    for store in made:
        store.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_create_list_revoke_and_the_journal(pg_db: pg.PgDatabase) -> None:
    store = PgKeyStore(pg_db.owner_url)
    key, token = store.create("ward-app", "user", ["m1", "m2"], rpm=60, tpm=1000)
    assert token.startswith(f"ms-{key.id}_")
    listed = store.all()
    assert [k.id for k in listed] == [key.id]
    assert listed[0].models == ("m1", "m2") and (listed[0].rpm, listed[0].tpm) == (60, 1000)
    assert listed[0].created == key.created and key.created.endswith("Z")
    revoked = store.revoke(key.id)
    assert revoked.id == key.id and store.all()[0].revoked is not None
    store.revoke(key.id)  # again: nothing more happens, no second journal entry
    changes = store.changes("gw-a")
    assert [c["action"] for c in changes] == ["key.created", "key.revoked"]
    assert changes[0]["name"] == "ward-app" and changes[0]["key_id"] == key.id
    store.mark_audited("gw-a", [int(str(c["n"])) for c in changes])
    assert store.changes("gw-a") == []
    assert len(store.changes("gw-b")) == 2  # each gateway copies the journal once
    with pytest.raises(KeyStoreError, match="no key with id nope"):
        store.revoke("nope")


def test_lookups_come_from_the_copy_and_see_a_revocation_after_a_refresh(
    pg_db: pg.PgDatabase, gateways: Callable[..., PgKeyStore]
) -> None:
    admin = PgKeyStore(pg_db.owner_url)  # medserve keys, somewhere else
    key, token = admin.create("ward-app")
    clock = Clock()
    gateway = gateways(pg_db.owner_url, refresh_s=0.5, stale_after_s=2.0, clock=clock)
    auth = Authenticator(gateway)
    with pytest.raises(UnavailableError) as never:  # nothing loaded yet: refused, not open
        auth.authenticate(f"Bearer {token}")
    assert never.value.status == 503 and never.value.code == "key_store_unavailable"
    assert gateway.refresh() is True
    assert auth.authenticate(f"Bearer {token}").id == key.id
    assert gateway.refresh() is False  # nothing changed: one one-row query, no reload
    admin.revoke(key.id)
    assert auth.authenticate(f"Bearer {token}").id == key.id  # the copy: not yet
    assert gateway.refresh() is True
    with pytest.raises(AuthenticationError, match="revoked"):
        auth.authenticate(f"Bearer {token}")


def test_a_change_made_by_hand_in_psql_is_seen_too(
    pg_db: pg.PgDatabase, gateways: Callable[..., PgKeyStore]
) -> None:
    admin = PgKeyStore(pg_db.owner_url)
    key, token = admin.create("ward-app")
    gateway = gateways(pg_db.owner_url)
    gateway.refresh()
    with psycopg.connect(pg_db.superuser_url, autocommit=True) as conn:
        conn.execute("UPDATE auth_keys SET revoked = now() WHERE id = %s", (key.id,))
    assert gateway.refresh() is True
    lookup = gateway.lookup(key.id)
    assert lookup is not None and lookup[0].revoked is not None


def test_a_copy_not_confirmed_within_stale_after_is_refused(
    pg_db: pg.PgDatabase, gateways: Callable[..., PgKeyStore]
) -> None:
    """The bound holds without the database: past stale_after_s every key is refused."""
    key, token = PgKeyStore(pg_db.owner_url).create("ward-app")
    clock = Clock()
    gateway = gateways(pg_db.owner_url, refresh_s=0.5, stale_after_s=2.0, clock=clock)
    gateway.refresh()
    auth = Authenticator(gateway)
    clock.now += 2.0
    assert auth.authenticate(f"Bearer {token}").id == key.id  # at the bound: still fresh
    clock.now += 0.01
    with pytest.raises(UnavailableError):
        auth.authenticate(f"Bearer {token}")
    gateway.url = pg_db.owner_url.replace(pg_db.server.passwords[pg.OWNER], "wrong")
    gateway.close()  # the refresher reconnects, and fails
    with pytest.raises(KeyStoreError):
        gateway.refresh()
    with pytest.raises(UnavailableError):
        auth.authenticate(f"Bearer {token}")


def test_a_newer_schema_is_refused_clearly(pg_db: pg.PgDatabase) -> None:
    PgKeyStore(pg_db.owner_url).all()  # migrates
    with psycopg.connect(pg_db.owner_url, autocommit=True) as conn:
        version = "SELECT version FROM schema_version WHERE component = 'keys'"
        assert conn.execute(version).fetchone() == (SCHEMA_VERSION,)
        conn.execute("UPDATE schema_version SET version = 99 WHERE component = 'keys'")
    with pytest.raises(KeyStoreError, match="keys schema is version 99; this medserve knows"):
        PgKeyStore(pg_db.owner_url).all()


def test_two_stores_migrating_at_once_migrate_once(pg_db: pg.PgDatabase) -> None:
    import threading

    errors: list[BaseException] = []

    def first_use() -> None:
        try:
            PgKeyStore(pg_db.owner_url).all()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=first_use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    with psycopg.connect(pg_db.owner_url) as conn:
        rows = "SELECT count(*) FROM schema_version WHERE component = 'keys'"
        assert conn.execute(rows).fetchone() == (1,)


@pytest.fixture
def secret_db(pg_db: pg.PgDatabase) -> str:
    """The owner's URL with SECRET_PASSWORD as its password (set here)."""
    with psycopg.connect(pg_db.superuser_url, autocommit=True) as conn:
        conn.execute(f"ALTER ROLE {pg.OWNER} PASSWORD '{SECRET_PASSWORD}'")
    pg_db.server.passwords[pg.OWNER] = SECRET_PASSWORD
    return pg_db.owner_url


def keys_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "medserve", "keys", *args]
    environ = {**os.environ, **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=120)


def test_the_cli_manages_keys_with_db(secret_db: str) -> None:
    made = keys_cli("create", "--name", "ward-app", "--rpm", "5", "--json", "--db", secret_db)
    assert made.returncode == 0, made.stderr
    listed = keys_cli("list", "--json", "--db", secret_db)
    assert listed.returncode == 0 and '"ward-app"' in listed.stdout
    key_id = PgKeyStore(secret_db).all()[0].id
    revoked = keys_cli("revoke", key_id, "--db", secret_db)
    assert revoked.returncode == 0 and f"revoked key {key_id}" in revoked.stdout
    from_settings = keys_cli("list", "--json", env={"MEDSERVE_AUTH__URL": secret_db})
    assert from_settings.returncode == 0 and '"revoked": "' in from_settings.stdout
    for done in (made, listed, revoked, from_settings):
        assert SECRET_PASSWORD not in done.stdout + done.stderr


@pytest.mark.parametrize("wrong", ["wrong-password", "db-that-is-not-there"])
def test_the_password_never_shows_in_errors(secret_db: str, wrong: str) -> None:
    url = (
        secret_db.replace(f"@/{secret_db.split('@/')[1].split('?')[0]}", "@/nowhere")
        if wrong == "db-that-is-not-there"
        else secret_db.replace(f"{pg.OWNER}:", f"{pg.GATEWAY}:")  # right password, wrong role
    )
    with pytest.raises(KeyStoreError) as failed:
        PgKeyStore(url).all()
    assert SECRET_PASSWORD not in str(failed.value)
    assert "postgresql://" in str(failed.value)  # says which database, without the password
    done = keys_cli("list", "--db", url)
    assert done.returncode != 0
    assert SECRET_PASSWORD not in done.stdout + done.stderr


def test_doctor_reports_the_database_without_its_password(secret_db: str) -> None:
    settings = Settings(auth=AuthSettings(url=secret_db))
    before = {c.name: c for c in checks(settings, [], hash_models=False, probe=True)}
    assert before["auth"].level == "warn" and "no schema yet" in before["auth"].detail
    PgKeyStore(secret_db).create("ward-app")
    after = {c.name: c for c in checks(settings, [], hash_models=False, probe=True)}
    assert after["auth"].level == "ok"
    assert f"1 active keys in postgresql://{pg.OWNER}:***@" in after["auth"].detail
    assert f"schema {SCHEMA_VERSION}" in after["auth"].detail
    broken = Settings(auth=AuthSettings(url=secret_db.replace("@/", "@/nowhere_")))
    failed = {c.name: c for c in checks(broken, [], hash_models=False, probe=True)}
    assert failed["auth"].level == "danger"
    for check in (*before.values(), *after.values(), *failed.values()):
        assert SECRET_PASSWORD not in check.detail


def test_roles_the_owner_migrates_the_gateway_reads_and_never_changes_a_key(
    pg_db: pg.PgDatabase, gateways: Callable[..., PgKeyStore]
) -> None:
    early = gateways(pg_db.gateway_url)
    with pytest.raises(KeyStoreError, match="medserve keys migrate"):
        early.refresh()  # no schema yet, and the gateway role may not make it
    done = keys_cli("migrate", "--db", pg_db.owner_url)
    assert done.returncode == 0, done.stderr
    assert f"keys schema at version {SCHEMA_VERSION}" in done.stdout
    assert pg_db.server.passwords[pg.OWNER] not in done.stdout
    key, token = PgKeyStore(pg_db.owner_url).create("ward-app", rpm=5)
    gateway = gateways(pg_db.gateway_url)
    gateway.refresh()
    assert Authenticator(gateway).authenticate(f"Bearer {token}").id == key.id
    assert [c["action"] for c in gateway.changes("gw-a")] == ["key.created"]
    gateway.mark_audited("gw-a", [1])
    with pytest.raises(KeyStoreError, match="permission denied"):
        PgKeyStore(pg_db.gateway_url).revoke(key.id)
    with pytest.raises(KeyStoreError, match="permission denied"):
        PgKeyStore(pg_db.gateway_url).create("sneaky")
    with psycopg.connect(pg_db.auditor_url) as conn:
        assert conn.execute("SELECT count(*) FROM auth_keys").fetchone() == (1,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM auth_rate")


def test_a_notification_refreshes_long_before_the_polling_would(
    pg_db: pg.PgDatabase, gateways: Callable[..., PgKeyStore]
) -> None:
    """With polling every 60 s, only NOTIFY can make the revocation seen within the wait."""
    admin = PgKeyStore(pg_db.owner_url)
    key, _ = admin.create("ward-app")
    gateway = gateways(pg_db.gateway_url, refresh_s=60.0, stale_after_s=120.0)
    gateway.refresh()

    async def scenario() -> float:
        watcher = asyncio.create_task(gateway.watch())
        try:
            deadline = time.monotonic() + 20.0
            while not gateway.listening:
                assert time.monotonic() < deadline, "never listening"
                await asyncio.sleep(0.01)
            start = time.monotonic()
            await asyncio.to_thread(admin.revoke, key.id)
            while (found := gateway.lookup(key.id)) is not None and found[0].revoked is None:
                assert time.monotonic() - start < 20.0, "revocation not seen"
                await asyncio.sleep(0.01)
            return time.monotonic() - start
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    took = asyncio.run(scenario())
    print(f"revocation seen after {took * 1000:.0f} ms (polling every 60 s)")


@pytest.mark.parametrize("command", [["keys", "list"], ["keys", "migrate"], ["serve"]])
def test_without_the_driver_the_commands_say_what_to_install(command: list[str]) -> None:
    """psycopg made unimportable in the child (sys.modules[...] = None)."""
    run = (
        "import sys; sys.modules['psycopg'] = None; sys.argv[0] = 'medserve'; "
        "from medserve.cli import main; main()"
    )
    url = "postgresql://gw:pw@/medserve?host=/nonexistent"
    args = [*command, "--db", url] if command[0] == "keys" else [*command, "--port", "0"]
    env = {**os.environ, "MEDSERVE_AUTH__URL": url}
    done = subprocess.run(
        [sys.executable, "-c", run, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 2, output  # fail(): a configuration the command cannot use
    assert "pip install 'medserve[postgres]'" in output and "Traceback" not in output


# Changes made by hand in psql, as the superuser or after SET ROLE: each is journaled once
# by the database itself, with the key's non-secret fields and who made it.
HAND_EDITS = [
    # name, statements ({id}: the key's id), action journaled or None, changed columns
    (
        "revoke",
        ["UPDATE auth_keys SET revoked = now() WHERE id = '{id}'"],
        "key.revoked",
        ["revoked"],
    ),
    (
        "un-revoke",
        [
            "UPDATE auth_keys SET revoked = now() WHERE id = '{id}'",
            "UPDATE auth_keys SET revoked = NULL WHERE id = '{id}'",
        ],
        "key.unrevoked",
        ["revoked"],
    ),
    (
        "widen",
        ["UPDATE auth_keys SET role = 'admin', models = '{{*}}'"],
        "key.changed",
        ["models", "role"],
    ),
    (
        "new secret",
        ["UPDATE auth_keys SET secret_sha256 = '\\x00'"],
        "key.changed",
        ["secret_sha256"],
    ),
    ("no change", ["UPDATE auth_keys SET name = name"], None, None),
    ("delete", ["DELETE FROM auth_keys"], "key.deleted", None),
    ("truncate", ["TRUNCATE auth_keys"], "key.deleted", None),
    (
        "insert",
        [
            "INSERT INTO auth_keys (id, name, role, models, created, secret_sha256) "
            "VALUES ('handmade0001', 'by-hand', 'admin', '{{*}}', now(), '\\x01')"
        ],
        "key.created",
        None,
    ),
    (
        "as another role",
        ["SET ROLE medserve_owner", "UPDATE auth_keys SET revoked = now()"],
        "key.revoked",
        ["revoked"],
    ),
]


@pytest.mark.parametrize(
    ("name", "statements", "action", "changed"), HAND_EDITS, ids=[e[0] for e in HAND_EDITS]
)
def test_a_change_made_by_hand_is_journaled_once_by_the_database(
    pg_db: pg.PgDatabase,
    name: str,
    statements: list[str],
    action: str | None,
    changed: list[str] | None,
) -> None:
    store = PgKeyStore(pg_db.owner_url)
    key, _ = store.create("ward-app", models=["m1"], rpm=5)
    [created] = store.changes("gw-a")  # the CLI path: journaled once, by the trigger too
    assert (created["action"], created["db_user"]) == ("key.created", pg.OWNER)
    store.mark_audited("gw-a", [int(str(created["n"]))])
    with psycopg.connect(pg_db.superuser_url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement.format(id=key.id))
    entries = store.changes("gw-a")
    if action is None:
        assert entries == []
        return
    last = entries[-1]
    assert [e["action"] for e in entries][-1] == action
    assert len(entries) == len(statements) - ("SET ROLE" in statements[0])
    role = pg.OWNER if name == "as another role" else pg.SUPERUSER
    assert (last["db_user"], last["db_session_user"]) == (role, pg.SUPERUSER)
    assert last.get("changed") == changed
    if action != "key.created":
        assert last["key_id"] == key.id and last["name"] == "ward-app" and last["rpm"] == 5
    assert "secret_sha256" not in last and "\\x00" not in json.dumps(last)
    assert last.get("truncated") is (True if name == "truncate" else None)


def test_an_entry_committed_after_a_later_one_is_still_copied(pg_db: pg.PgDatabase) -> None:
    """An entry numbered first and committed last (key changes mostly commit in order, as
    the generation row serialises them, but a journal entry is numbered before that lock
    is taken) is still found: a 'highest number copied' mark would skip it for ever;
    per-entry marks do not. The slow entry is written directly, standing for a change
    whose transaction got its number first."""
    store = PgKeyStore(pg_db.owner_url)
    quick, _ = store.create("quick")
    store.mark_audited("gw-a", [int(str(c["n"])) for c in store.changes("gw-a")])
    with psycopg.connect(pg_db.superuser_url) as slow:
        slow.execute(
            "INSERT INTO auth_journal (action, key_id, details) VALUES ('key.changed', 'held', "
            "'{}')"
        )
        store.revoke(quick.id)  # numbered after the open entry, committed before it
        [first] = store.changes("gw-a")
        assert first["key_id"] == quick.id
        store.mark_audited("gw-a", [int(str(first["n"]))])
        slow.commit()
    [late] = store.changes("gw-a")
    assert late["key_id"] == "held"
    assert int(str(late["n"])) < int(str(first["n"]))


GATEWAY_MARKS = [
    # statement as the gateway role, refused?
    ("INSERT INTO auth_copied (instance, n) VALUES ('gw-a', 1)", False),
    ("UPDATE auth_copied SET n = 9999", True),
    ("DELETE FROM auth_copied", True),
    ("TRUNCATE auth_copied", True),
    ("UPDATE auth_journal SET action = 'x'", True),
    ("DELETE FROM auth_journal", True),
    ("UPDATE auth_keys SET revoked = NULL", True),
]


@pytest.mark.parametrize(("statement", "refused"), GATEWAY_MARKS, ids=[s for s, _ in GATEWAY_MARKS])
def test_the_gateway_role_may_only_add_copy_marks(
    pg_db: pg.PgDatabase, statement: str, refused: bool
) -> None:
    """No mark a gateway can move: its credential adds marks, never changes or removes
    one (the `UPDATE auth_audited SET last = 9999` of old), nor touches the journal."""
    store = PgKeyStore(pg_db.owner_url)
    store.create("ward-app")
    with psycopg.connect(pg_db.gateway_url, autocommit=True) as conn:
        if refused:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
        else:
            conn.execute(statement)
    with psycopg.connect(pg_db.owner_url) as conn:
        assert conn.execute("SELECT count(*) FROM auth_journal").fetchone() == (1,)
        assert conn.execute("SELECT to_regclass('auth_audited')").fetchone() == (None,)


def test_version_1_marks_carry_over_to_version_2(pg_db: pg.PgDatabase) -> None:
    """A database migrated by the previous medserve (schema 1, Python-written journal, one
    'last' mark per gateway) keeps its marks: nothing is copied twice after the upgrade."""
    from medserve import pgsql
    from medserve.auth.pgkeys import MIGRATIONS

    with psycopg.connect(pg_db.owner_url, autocommit=True) as conn:
        assert pgsql.migrate(conn, "keys", MIGRATIONS[:1]) == 1
        for key_id in ("k1", "k2", "k3"):
            conn.execute(
                "INSERT INTO auth_journal (action, key_id, details) VALUES "
                "('key.created', %s, '{}')",
                (key_id,),
            )
        conn.execute("INSERT INTO auth_audited VALUES ('gw-a', 2)")
    store = PgKeyStore(pg_db.owner_url)
    assert [c["key_id"] for c in store.changes("gw-a")] == ["k3"]  # migrated on first use
    assert [c["key_id"] for c in store.changes("gw-b")] == ["k1", "k2", "k3"]
