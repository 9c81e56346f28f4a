"""Every malformed credential is a 401, never a 500, with or without a dev key configured.

The table runs twice: against :class:`medserve.auth.Authenticator` with a keys store
(with and without a dev key), and through the whole app (raw header bytes, as a client on
the wire would send them).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from medserve.api.app import create_app
from medserve.auth import Authenticator
from medserve.auth.keys import KeyStore
from medserve.config import AuthSettings, Settings
from medserve.errors import AuthenticationError
from medserve.router import Router
from tests.conftest import DEV_KEY, fake_spec

CHAT = "/v1/chat/completions"
BODY = {"model": "fake-echo", "messages": [{"role": "user", "content": "hello"}]}
HEADER_LIMIT = 16_000  # under h11's 16 KiB limit on a whole request head

MALFORMED = "invalid_authorization"
INVALID = "invalid_api_key"
# name, Authorization header value, the 401 code
CREDENTIALS: list[tuple[str, str, str]] = [
    ("empty", "", MALFORMED),
    ("spaces only", "   ", MALFORMED),
    ("Bearer alone", "Bearer", MALFORMED),
    ("Bearer and a space", "Bearer ", MALFORMED),
    ("wrong scheme", f"Basic {DEV_KEY}", MALFORMED),
    ("token scheme", f"Token {DEV_KEY}", MALFORMED),
    ("no scheme", DEV_KEY, MALFORMED),
    ("two tokens", f"Bearer {DEV_KEY} {DEV_KEY}", MALFORMED),
    ("tab inside", f"Bearer {DEV_KEY}\tx", MALFORMED),
    ("tab as separator", f"Bearer\t{DEV_KEY}", MALFORMED),
    ("e acute", "Bearer ms-dev_é", MALFORMED),
    ("dev key with e acute", f"Bearer {DEV_KEY}é", MALFORMED),
    ("cyrillic", "Bearer ms-дев_ключ", MALFORMED),
    ("cyrillic look-alike of the dev key", "Bearer " + DEV_KEY.replace("e", "е"), MALFORMED),
    ("nul", f"Bearer {DEV_KEY}\x00", MALFORMED),
    ("nul inside", "Bearer ms-dev\x00_x", MALFORMED),
    ("control character", f"Bearer {DEV_KEY}\x1b[31m", MALFORMED),
    ("delete character", f"Bearer {DEV_KEY}\x7f", MALFORMED),
    ("lone surrogate", "Bearer ms-dev_\ud800", MALFORMED),
    ("very long", "Bearer " + "a" * HEADER_LIMIT, INVALID),
    ("very long key shape", "Bearer ms-" + "0" * 12 + "_" + "a" * HEADER_LIMIT, INVALID),
    ("very long non-ascii", "Bearer " + "é" * (HEADER_LIMIT // 2), MALFORMED),
    ("dev key prefix", f"Bearer {DEV_KEY[:-1]}", INVALID),
    ("dev key and more", f"Bearer {DEV_KEY}x", INVALID),
    ("unknown key", "Bearer ms-000000000000_" + "x" * 43, INVALID),
    ("key id with quote", "Bearer ms-'OR'1'='1_x", INVALID),
]
# Header values a client can put on the wire: bytes (latin-1 decodable, like the server).
WIRE = [c for c in CREDENTIALS if "\ud800" not in c[1]]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[KeyStore]:
    keys = KeyStore(tmp_path / "keys.db")
    keys.create("triage-app", "user", ["fake-echo"])
    yield keys
    keys.close()


@pytest.mark.parametrize("dev_key", [DEV_KEY, None], ids=["dev key", "no dev key"])
@pytest.mark.parametrize(
    ("header", "code"), [c[1:] for c in CREDENTIALS], ids=[c[0] for c in CREDENTIALS]
)
def test_the_authenticator_refuses_with_401(
    store: KeyStore, dev_key: str | None, header: str, code: str
) -> None:
    with pytest.raises(AuthenticationError) as refused:
        Authenticator(store, dev_key).authenticate(header)
    assert refused.value.status == 401
    assert refused.value.code == code


def test_the_dev_key_and_a_stored_key_still_authenticate(store: KeyStore) -> None:
    _, token = store.create("ops", "admin")
    auth = Authenticator(store, DEV_KEY)
    assert auth.authenticate(f"Bearer {DEV_KEY}").id == "dev"
    assert auth.authenticate(f"bearer  {DEV_KEY} ").id == "dev"  # scheme case, extra spaces
    assert auth.authenticate(f"Bearer {token}").name == "ops"


@pytest.mark.parametrize("dev_key", [DEV_KEY, None], ids=["dev key", "no dev key"])
@pytest.mark.parametrize(("header", "code"), [c[1:] for c in WIRE], ids=[c[0] for c in WIRE])
def test_the_server_answers_401_for_raw_header_bytes(
    monkeypatch: pytest.MonkeyPatch, dev_key: str | None, header: str, code: str
) -> None:
    if dev_key is None:
        monkeypatch.delenv("MEDSERVE_AUTH__DEV_KEY")
    auth = AuthSettings(dev_key=SecretStr(dev_key) if dev_key else None)
    app = create_app(Settings(auth=auth), Router.from_specs([fake_spec()]))
    with TestClient(app, raise_server_exceptions=False) as client:
        # UTF-8 on the wire, as curl sends it; the server reads header bytes as latin-1.
        r = client.post(CHAT, json=BODY, headers={b"Authorization": header.encode()})
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == code
    assert r.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize("dev_key", ["dev key é", "with space", "tab\there", ""])
def test_a_dev_key_that_cannot_travel_in_a_header_is_refused_at_configuration(
    dev_key: str,
) -> None:
    with pytest.raises(ValueError, match="dev_key"):
        AuthSettings(dev_key=SecretStr(dev_key))
