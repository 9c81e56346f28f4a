"""`medserve keys create | list | revoke`: the secret is shown once and stored only hashed."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medserve.auth import Authenticator, KeyStore
from medserve.auth import keys as keys_module
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


IDS = ("ed0433aa0001", "ed0433bb0002", "ff0012340003")


@pytest.fixture
def three_keys(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Three keys with the ids of IDS (two share the prefix ed0433) and long names."""
    ids = iter(IDS)
    monkeypatch.setattr(keys_module, "new_secret", lambda: (next(ids), "s" * 43))
    long_name = "a-very-long-application-name-for-the-ward-discharge-summaries"
    for i in range(3):
        made = runner.invoke(app, ["keys", "create", "--name", f"{long_name}-{i}", "--json"])
        assert made.exit_code == 0, made.stderr
    return list(IDS)


@pytest.mark.parametrize("columns", ["40", "80", "200"])
def test_list_never_cuts_an_id(three_keys: list[str], columns: str) -> None:
    shown = runner.invoke(app, ["keys", "list"], env={"COLUMNS": columns})
    assert shown.exit_code == 0, shown.stderr
    for key_id in three_keys:
        assert key_id in shown.stdout, shown.stdout


@pytest.mark.parametrize(
    ("given", "revoked", "error"),
    [
        ("ff0012340003", "ff0012340003", None),  # the whole id
        ("ff00", "ff0012340003", None),  # a unique prefix
        ("ed0433b", "ed0433bb0002", None),
        ("ed0433bb…", "ed0433bb0002", None),  # copied from a cut display
        ("ed0433", None, "start of 2 keys' ids (ed0433aa0001, ed0433bb0002)"),  # ambiguous
        ("ff0", None, "at least 4 characters"),  # unique but too short to be meant
        ("ab12", None, "no key with id ab12"),
    ],
)
def test_revoke_takes_an_id_or_a_unique_prefix(
    three_keys: list[str], given: str, revoked: str | None, error: str | None
) -> None:
    done = runner.invoke(app, ["keys", "revoke", given], env={"COLUMNS": "200"})
    listed = json.loads(runner.invoke(app, ["keys", "list", "--json"]).stdout)
    gone = [k["id"] for k in listed if k["revoked"]]
    if error is None:
        assert done.exit_code == 0, done.stderr
        assert f"revoked key {revoked} (" in done.stdout
        assert gone == [revoked]
    else:
        assert done.exit_code == 2
        assert error in " ".join(done.stderr.split())
        assert gone == []
