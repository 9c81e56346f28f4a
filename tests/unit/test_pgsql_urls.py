"""Database URLs as medserve shows them: the password hidden in every form a user may
write it (libpq accepts some special characters unescaped), and the hosts the URL names.

The oracle for "what is the password" is libpq's own parser (psycopg's
``conninfo_to_dict``): whatever libpq would send as the password must not be shown."""

from __future__ import annotations

import pytest

from medserve import pgsql

URLS = [  # (url, shown); the first group from a fresh user's pass (issue 19)
    ("postgresql://u:Sec#ret9@db:5439/m", "postgresql://u:***@db:5439/m"),
    ("postgresql://u:a?b=c@db/m", "postgresql://u:***@db/m"),
    ("postgresql://u:p@ss:w/rd?x=1#Z@db/m", "postgresql://u:***@db/m"),
    ("postgresql://u:a/b@db/m", "postgresql://u:***@db/m"),
    ("postgresql://u:pw%23x@db/m", "postgresql://u:***@db/m"),
    ("postgresql://u:pw@db/m?password=other", "postgresql://u:***@db/m?password=***"),
    (
        "postgres://u@db/m?sslmode=require&PASSWORD=zz9x",
        "postgres://u@db/m?sslmode=require&PASSWORD=***",
    ),
    ("postgresql://u@h1:5432,h2:5433/m", "postgresql://u@h1:5432,h2:5433/m"),
    ("postgresql:///m?host=/run/postgresql", "postgresql:///m?host=/run/postgresql"),
]


@pytest.mark.parametrize(("url", "shown"), URLS)
def test_the_password_is_hidden_however_it_is_written(url: str, shown: str) -> None:
    assert pgsql.redact(url) == shown
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:  # the postgres extra is not installed: the table alone
        return
    try:
        libpq = conninfo_to_dict(url).get("password")
    except Exception:  # libpq refuses the URL: nothing of it is sent anywhere
        libpq = None
    if libpq:
        assert str(libpq) not in pgsql.redact(url)
        assert str(libpq) not in pgsql.scrub(f"error near {libpq}", url)


SCRUBBED = [  # (url, a driver's message, what may be shown)
    ("postgresql://u:Sec#ret9@db/m", "password Sec#ret9 refused", "password *** refused"),
    ("postgresql://u:s%40cret@db/m", "bad s@cret and s%40cret", "bad *** and ***"),
    ("postgresql://u:pw@db/m?password=other1", "other1 refused", "*** refused"),
    # libpq misreads "u:longpart/rest@db" as host u, port longpart: the piece is hidden
    ("postgresql://u:longpart/restpart@db/m", 'invalid port "longpart"', 'invalid port "***"'),
    ("postgresql://u@db/m", "no password here", "no password here"),
]


@pytest.mark.parametrize(("url", "text", "shown"), SCRUBBED)
def test_driver_messages_are_scrubbed(url: str, text: str, shown: str) -> None:
    assert pgsql.scrub(text, url) == shown


HOSTS = [  # (url, hosts named, what doctor shows)
    ("postgresql://u:pw@db.ward/m", ["db.ward:5432"], "db.ward:5432"),
    ("postgresql://u@h1:5432,h2:5433/m", ["h1:5432", "h2:5433"], "h1:5432, h2:5433"),
    ("postgresql://[::1]:5433/m", ["[::1]:5433"], "[::1]:5433"),
    ("postgresql:///m?host=db1,db2&port=5432,5433", ["db1:5432", "db2:5433"], "db1:5432, db2:5433"),
    ("postgresql:///m?host=/run/postgresql", [], "local socket"),
    ("postgresql://u:p@ss:w/rd?x=1#Z@db/m", ["db:5432"], "db:5432"),
]


@pytest.mark.parametrize(("url", "hosts", "shown"), HOSTS)
def test_the_hosts_a_url_names(url: str, hosts: list[str], shown: str) -> None:
    assert pgsql.hosts_of(url) == hosts
    assert pgsql.host_of(url) == shown


ENV_HOSTS = [  # (url, PGHOST, the names the egress guard allows)
    ("postgresql://u@db.ward/m", "other", ["db.ward"]),
    ("postgresql:///m", "db1.ward,db2.ward", ["db1.ward", "db2.ward"]),
    ("postgresql:///m", "/run/postgresql", []),
    ("postgresql:///m?host=/run/postgresql", "db.ward", []),
]


@pytest.mark.parametrize(("url", "pghost", "names"), ENV_HOSTS)
def test_the_guard_allows_the_host_libpq_will_use(
    monkeypatch: pytest.MonkeyPatch, url: str, pghost: str, names: list[str]
) -> None:
    monkeypatch.setenv("PGHOST", pghost)
    assert pgsql.host_names(url) == names
