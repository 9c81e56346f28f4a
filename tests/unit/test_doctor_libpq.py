"""`medserve doctor` judges a database connection as libpq will make it: each setting from
the URL, else libpq's environment (PGSSLMODE, PGHOST, PGHOSTADDR, PGSSLROOTCERT), else
libpq's default. A fresh user had PGSSLMODE=disable and a remote URL: doctor said
"sslmode=prefer ... warn" and exited 0, where libpq would connect in clear text.

And settings files that hold a secret (a password in a URL, an API key) while any user of
the machine may read them."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from medserve.config import AuditSettings, AuthSettings, Settings, load_settings
from medserve.doctor import Check, checks
from tests.conftest import ROOT

pytest.importorskip("psycopg", reason="the postgres extra (psycopg) is not installed")

REMOTE = "postgresql://gw:pw@db.example:5432/medserve"
LOCAL = "postgresql://gw:pw@/medserve"  # no host: libpq's default is a local socket
CA = "{ca}"  # replaced by an existing CA file


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """No PG* variable of the machine running the tests, and a HOME of the test's own (its
    ~/.postgresql/root.crt is libpq's default root certificate: absent)."""
    for name in list(os.environ):
        if name.startswith("PG"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    ca = tmp_path / "db-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    yield ca


def tls(url: str) -> Check | None:
    settings = Settings(audit=AuditSettings(url=SecretStr(url)))
    found = {c.name: c for c in checks(settings, [], hash_models=False, probe=False)}
    return found.get("audit database TLS")


TLS = [  # (url, environment, level of the check or None, a word its detail must hold)
    (REMOTE, {}, "warn", "sslmode=prefer"),
    (REMOTE + "?sslmode=disable", {}, "danger", "sslmode=disable"),
    (REMOTE + "?sslmode=require", {}, "warn", "sslmode=require"),
    # the fresh user's case: libpq takes sslmode from the environment
    (REMOTE, {"PGSSLMODE": "disable"}, "danger", "PGSSLMODE"),
    (REMOTE, {"PGSSLMODE": "allow"}, "danger", "PGSSLMODE"),
    (REMOTE, {"PGSSLMODE": "verify-full", "PGSSLROOTCERT": CA}, None, ""),
    # the URL's own setting wins over the environment's
    (REMOTE + f"?sslmode=verify-full&sslrootcert={CA}", {"PGSSLMODE": "disable"}, None, ""),
    (REMOTE + "?sslmode=require", {"PGSSLMODE": "verify-full"}, "warn", "sslmode=require"),
    # verified, but with a root certificate libpq will not find: it refuses to connect
    (REMOTE + "?sslmode=verify-full", {}, "danger", "root.crt"),
    (
        REMOTE,
        {"PGSSLMODE": "verify-ca", "PGSSLROOTCERT": "/nonexistent/ca.pem"},
        "danger",
        "PGSSLROOTCERT",
    ),
    (REMOTE + "?sslmode=verify-full&sslrootcert=system", {}, None, ""),
    # where it connects: the URL's host, else PGHOST / PGHOSTADDR, else a local socket
    (LOCAL, {}, None, ""),
    (LOCAL, {"PGHOST": "db.example"}, "warn", "sslmode=prefer"),
    (LOCAL, {"PGHOSTADDR": "10.1.2.3", "PGSSLMODE": "disable"}, "danger", "PGSSLMODE"),
    (LOCAL + "?host=/run/postgresql", {"PGHOST": "db.example"}, None, ""),
    ("postgresql://gw:pw@127.0.0.1/medserve", {"PGSSLMODE": "disable"}, None, ""),
    (REMOTE + "?hostaddr=127.0.0.1", {"PGSSLMODE": "disable"}, None, ""),
]


@pytest.mark.parametrize(("url", "env", "level", "word"), TLS)
def test_tls_is_judged_as_libpq_resolves_it(
    monkeypatch: pytest.MonkeyPatch,
    clean_env: Path,
    url: str,
    env: dict[str, str],
    level: str | None,
    word: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value.replace(CA, str(clean_env)))
    found = tls(url.replace(CA, str(clean_env)))
    if level is None:
        assert found is None, found
    else:
        assert found is not None and found.level == level, found
        assert word in found.detail and "pw" not in found.detail.replace("PGPASS", "")


def test_the_command_exits_1_for_an_environment_that_disables_tls(tmp_path: Path) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PG")},
        "PGSSLMODE": "disable",
        "MEDSERVE_AUDIT__URL": REMOTE,
        "MEDSERVE_AUDIT__PATH": str(tmp_path / "audit" / "audit.db"),
        "MEDSERVE_AUTH__KEYS_PATH": str(tmp_path / "keys.db"),
    }
    cmd = [sys.executable, "-m", "medserve", "doctor", "--no-probe", "--no-hash", "--json"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "PGSSLMODE" in done.stdout


# -- settings files holding a secret -------------------------------------------------------

FILES = [  # (file's text, mode, level of the "config file" check or None, names in its detail)
    (f'[audit]\nurl = "{REMOTE}"\n', 0o644, "warn", "audit.url (a password in the URL)"),
    (f'[auth]\nurl = "{REMOTE}"\n', 0o604, "warn", "auth.url"),
    ('[auth]\ndev_key = "msk_dev_0123456789abcdef"\n', 0o644, "warn", "auth.dev_key"),
    (f'[audit]\nurl = "{REMOTE}"\n', 0o600, None, ""),  # only its owner reads it
    (f'[audit]\nurl = "{REMOTE}"\n', 0o640, None, ""),  # and the service's group
    ('[audit]\nurl = "postgresql://gw@db.example/m"\n', 0o644, None, ""),  # no password
    ('[auth]\nurl = "postgresql://gw@db.example/m?password=zz9"\n', 0o644, "warn", "auth.url"),
]


@pytest.mark.parametrize(("text", "mode", "level", "names"), FILES)
def test_a_settings_file_with_a_secret_that_others_may_read(
    tmp_path: Path, text: str, mode: int, level: str | None, names: str
) -> None:
    path = tmp_path / "medserve.toml"
    path.write_text(f'models_dir = "{tmp_path / "models"}"\n' + text)
    path.chmod(mode)
    settings = load_settings(path)
    found = list(checks(settings, [], hash_models=False, probe=False))
    files = [c for c in found if c.name == "config file"]
    if level is None:
        assert files == []
    else:
        assert [c.level for c in files] == [level]
        assert names in files[0].detail and f"mode {mode:o}" in files[0].detail
    assert all("pw" not in c.detail and "zz9" not in c.detail for c in found)


def test_a_registry_file_with_an_api_key_that_others_may_read(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    entry = models / "med.toml"
    entry.write_text(
        'id = "med"\nengine = "vllm"\nurl = "https://gpu-1.ward:8443"\napi_key = "sk-ward-1234"\n'
    )
    entry.chmod(0o644)
    settings = Settings(models_dir=models, auth=AuthSettings())
    found = list(checks(settings, [], hash_models=False, probe=False))
    files = [c for c in found if c.name == "config file"]
    assert [c.level for c in files] == ["warn"] and "api_key" in files[0].detail
    assert "sk-ward" not in files[0].detail
