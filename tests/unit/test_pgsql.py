"""Connection strings (medserve.pgsql) and the [auth] database settings: what is shown
of a string is never its password. No database needed."""

from __future__ import annotations

import pytest

from medserve.config import AuthSettings, Settings
from medserve.errors import ConfigError
from medserve.pgsql import is_postgres_url, redact, scrub

PASSWORD = "s3cr%t/P@ss"  # characters that URL-encoding changes
ENCODED = "s3cr%25t%2FP%40ss"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            f"postgresql://gw:{ENCODED}@db.ward:5432/medserve?sslmode=verify-full",
            "postgresql://gw:***@db.ward:5432/medserve?sslmode=verify-full",
        ),
        (
            "postgresql://gw@/medserve?host=/run/postgresql&password=inline",
            "postgresql://gw@/medserve?host=/run/postgresql&password=***",
        ),
        (
            "postgres://db.ward/medserve?sslmode=require",
            "postgres://db.ward/medserve?sslmode=require",
        ),
    ],
)
def test_redact_never_shows_a_password(url: str, shown: str) -> None:
    assert redact(url) == shown


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
