"""`medserve doctor`: dangerous postures are named and make it exit 1."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from medserve.cli import app
from medserve.config import AuditSettings, AuthSettings, Settings
from medserve.doctor import Check, checks
from tests.conftest import flat_spec


def levels(found: list[Check]) -> dict[str, str]:
    return {c.name: c.level for c in found}


def posture(**overrides: Any) -> dict[str, str]:
    return levels(list(checks(Settings(**overrides), [], hash_models=False)))


def test_the_default_posture_has_no_danger() -> None:
    found = posture()
    assert "danger" not in found.values(), found
    assert found["bind"] == found["tls"] == "ok"


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"host": "0.0.0.0"}, "tls"),  # network bind, clear text
        ({"host": "10.1.2.3", "auth": AuthSettings(enabled=False)}, "auth"),
        ({"audit": AuditSettings(enabled=False)}, "audit"),
        ({"tls_certfile": Path("/nope.pem"), "tls_keyfile": Path("/nope.key")}, "tls"),
    ],
)
def test_dangerous_settings_are_named(overrides: dict[str, Any], name: str) -> None:
    assert posture(**overrides)[name] == "danger"


def test_models_are_listed_with_their_sha256(tmp_path: Path) -> None:
    weights = tmp_path / "m.gguf"
    weights.write_bytes(b"GGUF" + bytes(100))
    spec = flat_spec(id="m", path=weights)
    missing = flat_spec(id="gone", path=tmp_path / "gone.gguf")
    found = list(checks(Settings(), [spec, missing]))
    by_name = {c.name: c for c in found}
    assert hashlib.sha256(weights.read_bytes()).hexdigest() in by_name["model m"].detail
    assert by_name["model gone"].level == "danger"


def test_the_command_exits_1_on_danger_and_0_otherwise() -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["doctor", "--no-hash", "--json"])
    assert ok.exit_code == 0, ok.stdout
    bad = runner.invoke(app, ["doctor", "--no-hash", "--host", "0.0.0.0"])
    assert bad.exit_code == 1
    assert "danger" in bad.stdout


def test_a_model_that_no_longer_matches_its_manifest_is_a_danger(tmp_path: Path) -> None:
    from medserve import manifest as mf

    weights = tmp_path / "m.gguf"
    weights.write_bytes(b"GGUF" + bytes(100))
    mf.write(tmp_path, {"kind": "gguf"})
    spec = flat_spec(id="m", path=weights, manifest=tmp_path / mf.NAME)
    (ok,) = [c for c in checks(Settings(), [spec]) if c.name == "model m"]
    assert ok.level == "ok" and "matches its manifest" in ok.detail
    weights.write_bytes(b"GGUF" + bytes(101))
    (bad,) = [c for c in checks(Settings(), [spec]) if c.name == "model m"]
    assert bad.level == "danger" and "does not match its manifest" in bad.detail


def test_proxy_headers_and_connection_limits_are_reported() -> None:
    default = {c.name: c for c in checks(Settings(), [], hash_models=False)}
    assert default["proxy headers"].level == "ok"
    assert "ignored" in default["proxy headers"].detail
    assert default["connections"].detail == (
        "at most 256 open; request head within 10 s, body within 30 s, idle keep-alive 5 s"
    )
    settings = Settings(
        trusted_proxies=["10.0.0.5"],
        max_connections=64,
        header_timeout_s=2,
        body_timeout_s=3.5,
        keep_alive_timeout_s=1,
    )
    found = {c.name: c for c in checks(settings, [], hash_models=False)}
    assert found["proxy headers"].detail == "X-Forwarded-For believed from 10.0.0.5"
    assert found["connections"].detail == (
        "at most 64 open; request head within 2 s, body within 3.5 s, idle keep-alive 1 s"
    )
    assert posture(trusted_proxies=["0.0.0.0/0"])["proxy headers"] == "warn"


def test_trusted_proxies_must_be_addresses() -> None:
    from medserve.config import load_settings
    from medserve.errors import ConfigError

    with pytest.raises(ConfigError, match="trusted_proxies"):
        load_settings(trusted_proxies=["proxy.example"])


def test_each_vllm_replica_is_probed_for_health_and_load() -> None:
    """Named kind:index; ready with its scraped load (unknown when not exported), a
    failing /health or a closed port a warning (the server still starts without it)."""
    from medserve.config import ModelSpec
    from tests.fakeupstream import Knobs, running_upstream

    with running_upstream() as gone:
        closed = gone.url  # stopped on leaving: its port refuses connections
    with running_upstream() as up, running_upstream() as sick:
        up.knobs = Knobs(waiting=2, kv_usage=0.25)
        sick.knobs = Knobs(health=503)
        replicas = [{"engine": "vllm", "url": u} for u in (up.url, sick.url, closed)]
        spec = ModelSpec.model_validate({"id": "med", "replicas": replicas})
        found = {c.name: c for c in checks(Settings(), [spec], hash_models=False)}
        unprobed = {c.name: c for c in checks(Settings(), [spec], probe=False)}
        up.knobs = Knobs(waiting=None, kv_usage=None)
        unknown = {c.name: c for c in checks(Settings(), [spec], hash_models=False)}
    ready, failing, down = (found[f"model med replica vllm:{i}"] for i in range(3))
    assert (ready.level, failing.level, down.level) == ("ok", "warn", "warn")
    assert ready.detail.endswith(": ready; waiting 2, running 0, kv cache 25%")
    assert failing.detail.endswith("/health answered 503 (not ready)")
    assert down.detail.endswith("unreachable (ConnectError)")
    assert unknown["model med replica vllm:0"].detail.endswith(
        "ready; waiting unknown, running 0, kv cache unknown"
    )
    assert all(c.detail.endswith("(not probed)") for n, c in unprobed.items() if "vllm" in n)


def test_remote_replicas_show_in_the_egress_line_and_plain_http_off_machine_warns() -> None:
    spec = flat_spec(
        id="med",
        replicas=[
            {"engine": "vllm", "url": "http://10.1.2.3:8000"},
            {"engine": "vllm", "url": "https://gpu-2.ward:8443"},
            {"engine": "vllm", "url": "http://127.0.0.1:8001"},
        ],
    )
    found = {c.name: c for c in checks(Settings(), [spec], probe=False)}
    assert found["egress guard"].detail.endswith("allowed: 10.1.2.3, 127.0.0.1, gpu-2.ward")
    transport = found["vllm transport"]
    assert transport.level == "warn" and "http://10.1.2.3:8000" in transport.detail
    assert "gpu-2" not in transport.detail and "127.0.0.1" not in transport.detail


DATABASES = [  # (audit url, auth url, the guard allows, the "outside the guard" line lists)
    ("postgresql://gw:pw@db.ward:5433/m", None, "db.ward", "db.ward"),
    (None, "postgresql://gw@10.2.3.4/m?sslmode=verify-full", "10.2.3.4", "10.2.3.4"),
    ("postgresql://gw@db.ward/m", "postgresql://gw@db.ward/m", "db.ward", "db.ward"),
    ("postgresql://gw@127.0.0.1/m", "postgresql:///m?host=/run/postgresql", "127.0.0.1", None),
    ("postgresql://gw@localhost:5432/m", None, "localhost", None),
]


@pytest.mark.parametrize(("audit_url", "auth_url", "allowed", "listed"), DATABASES)
def test_database_hosts_are_allowed_and_named_as_outside_the_guard(
    audit_url: str | None, auth_url: str | None, allowed: str, listed: str | None
) -> None:
    settings = Settings(audit=AuditSettings(url=audit_url), auth=AuthSettings(url=auth_url))
    found = {c.name: c for c in checks(settings, [], probe=False, hash_models=False)}
    assert found["egress guard"].detail.endswith(f"allowed: {allowed}")
    line = found.get("egress outside the guard")
    if listed is None:
        assert line is None
    else:
        assert line is not None and line.detail.startswith(f"PostgreSQL at {listed}: libpq")
        assert "pw" not in line.detail
