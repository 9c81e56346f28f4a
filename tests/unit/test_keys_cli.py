"""`medserve keys create | list | revoke`: the secret is shown once and stored only hashed."""

from __future__ import annotations

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
