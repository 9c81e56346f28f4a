"""The [auth] database settings without a database: the URL is a checked secret, scrubbed
in every spelling, never echoed by a config error; doctor names a database reached
without verified TLS and, unprobed, connects to nothing. (pgsql.redact's cases are in
tests/postgres/test_pgsql.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from medserve.config import AuthSettings, Settings
from medserve.doctor import checks
from medserve.errors import ConfigError
from medserve.pgsql import is_postgres_url, scrub

PASSWORD = "s3cr%t/P@ss"  # characters that URL-encoding changes
ENCODED = "s3cr%25t%2FP%40ss"


def test_scrub_removes_the_password_in_every_spelling() -> None:
    url = f"postgresql://gw:{ENCODED}@db.ward/medserve"
    text = f"failed for {url}; raw {PASSWORD}; encoded {ENCODED}"
    cleaned = scrub(text, url)
    assert PASSWORD not in cleaned and ENCODED not in cleaned
    assert "db.ward" in cleaned
    assert scrub("nothing to hide", "postgresql://gw@db.ward/x") == "nothing to hide"


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("postgresql://h/db", True),
        ("postgres://h/db", True),
        ("var/keys.db", False),
        ("/var/lib/medserve/keys.db", False),
    ],
)
def test_is_postgres_url(target: str, expected: bool) -> None:
    assert is_postgres_url(target) is expected


def test_the_auth_url_setting_is_a_secret_and_checked() -> None:
    url = f"postgresql://gw:{ENCODED}@db.ward/medserve"
    auth = AuthSettings(url=url)
    assert ENCODED not in repr(auth) and ENCODED not in str(Settings(auth=auth).model_dump())
    assert auth.keys_target() == url
    with pytest.raises(ValueError, match="postgresql:// connection string"):
        AuthSettings(url="mysql://db/x")
    with pytest.raises(ValueError, match="stale_after_s must be longer than refresh_s"):
        AuthSettings(refresh_s=2, stale_after_s=1)


def test_a_bad_auth_url_in_the_environment_does_not_echo_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from medserve.config import load_settings

    monkeypatch.setenv("MEDSERVE_AUTH__URL", f"mysql://gw:{ENCODED}@db/x")
    with pytest.raises(ConfigError) as failed:
        load_settings()
    assert ENCODED not in str(failed.value)


@pytest.mark.parametrize(
    ("query", "level"),
    [
        ("sslmode=disable", "danger"),
        ("sslmode=require", "warn"),
        ("", "warn"),  # libpq's default, prefer: encryption without verification
        ("sslmode=verify-full&sslrootcert={ca}", None),
        ("sslmode=verify-full&sslrootcert=/nonexistent/ca.pem", "danger"),  # libpq refuses
    ],
)
def test_doctor_names_keys_reached_without_verified_tls(
    tmp_path: Path, query: str, level: str | None
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    url = f"postgresql://gw:{ENCODED}@db.ward:5432/medserve?{query.format(ca=ca)}"
    settings = Settings(auth=AuthSettings(url=url))
    found = {c.name: c for c in checks(settings, [], hash_models=False, probe=False)}
    tls = found.get("keys database TLS")
    assert (tls.level if tls else None) == level
    assert "(not probed)" in found["auth"].detail
    assert all(ENCODED not in c.detail and PASSWORD not in c.detail for c in found.values())
