"""`medserve keys create | list | revoke`: the secret is shown once and stored only hashed."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

from typer.testing import CliRunner

from medserve.auth import Authenticator, KeyStore
from medserve.cli import app

runner = CliRunner()


def test_create_list_revoke(tmp_path: Path) -> None:
    created = runner.invoke(
        app,
        ["keys", "create", "--name", "triage", "--models", "a,b", "--rpm", "60", "--json"],
    )
    assert created.exit_code == 0, created.stderr
    made = json.loads(created.stdout)
    token = made["key"]
    assert token.startswith(f"ms-{made['id']}_") and len(token) > 50
    assert (made["models"], made["rpm"], made["role"]) == (["a", "b"], 60, "user")
    # Only a hash is stored: the secret appears nowhere in the database file.
    db = tmp_path / "keys.db"
    secret = token.partition("_")[2]
    assert secret.encode() not in db.read_bytes()
    auth = Authenticator(KeyStore(db))
    assert auth.authenticate(f"Bearer {token}").id == made["id"]

    listed = json.loads(runner.invoke(app, ["keys", "list", "--json"]).stdout)
    assert [k["name"] for k in listed] == ["triage"] and "key" not in listed[0]

    assert runner.invoke(app, ["keys", "revoke", made["id"]]).exit_code == 0
    listed = json.loads(runner.invoke(app, ["keys", "list", "--json"]).stdout)
    assert listed[0]["revoked"] is not None
    conn = sqlite3.connect(db)
    actions = [a for (a,) in conn.execute("SELECT action FROM journal ORDER BY n")]
    conn.close()
    assert actions == ["key.created", "key.revoked"]


def test_bad_arguments_are_usage_errors() -> None:
    assert runner.invoke(app, ["keys", "create", "--name", "x", "--role", "root"]).exit_code == 2
    bad_date = ["keys", "create", "--name", "x", "--expires", "soon"]
    assert runner.invoke(app, bad_date).exit_code == 2
    assert runner.invoke(app, ["keys", "revoke", "nope"]).exit_code == 2


def test_no_fallback_is_stored_listed_and_journaled(tmp_path: Path) -> None:
    for args in (["--name", "strict", "--no-fallback"], ["--name", "lenient"]):
        done = runner.invoke(app, ["keys", "create", *args, "--json"])
        assert done.exit_code == 0, done.stderr
    listed = {
        k["name"]: k["fallback"]
        for k in json.loads(runner.invoke(app, ["keys", "list", "--json"]).stdout)
    }
    assert listed == {"strict": False, "lenient": True}
    table = runner.invoke(app, ["keys", "list"]).stdout
    assert "fallback" in table and " no " in table and " yes " in table
    conn = sqlite3.connect(tmp_path / "keys.db")
    details = [json.loads(d) for (d,) in conn.execute("SELECT details FROM journal ORDER BY n")]
    conn.close()
    assert [d["fallback"] for d in details] == [False, True]


# The keys table as the first release made it, before the `fallback` column.
OLD_SCHEMA = """
CREATE TABLE keys (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT NULL, models TEXT NOT NULL,
    rpm INTEGER, tpm INTEGER, expires TEXT, created TEXT NOT NULL, revoked TEXT,
    secret_sha256 BLOB NOT NULL
) STRICT;
"""


def test_an_old_keys_database_is_migrated_and_its_keys_keep_working(tmp_path: Path) -> None:
    db = tmp_path / "keys.db"
    old = sqlite3.connect(db, isolation_level=None)
    old.executescript(OLD_SCHEMA)
    old.execute(
        "INSERT INTO keys VALUES ('abc123', 'ward-app', 'user', '[\"*\"]', 60, NULL, NULL, "
        "'2026-01-01T00:00:00.000000Z', NULL, ?)",
        (hashlib.sha256(b"s3cret").digest(),),
    )
    old.close()
    store = KeyStore(db)
    key = Authenticator(store).authenticate("Bearer ms-abc123_s3cret")
    assert (key.name, key.rpm, key.fallback) == ("ward-app", 60, True)  # the old behaviour
    made, _ = store.create("strict", fallback=False)
    assert {k.name: k.fallback for k in store.all()} == {"ward-app": True, "strict": False}
    assert made.fallback is False
    store.close()
    # Opening it again changes nothing (the migration runs once).
    conn = sqlite3.connect(db)
    columns = [row[1] for row in conn.execute("PRAGMA table_info(keys)")]
    conn.close()
    assert columns.count("fallback") == 1
    assert KeyStore(db).all()[0].name == "ward-app"
