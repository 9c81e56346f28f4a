"""Settings precedence, the model registry, --model parsing."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest

from medserve.config import load_settings
from medserve.errors import ConfigError
from medserve.registry import load_registry, served_models, spec_from_cli
from tests.conftest import ROOT, flat_spec, llama


def test_defaults_are_safe(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MEDSERVE_HOST", "MEDSERVE_PORT"):
        monkeypatch.delenv(var, raising=False)
    s = load_settings()
    assert s.host == "127.0.0.1"
    assert s.port == 8000


def test_precedence_file_env_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "medserve.toml"
    cfg.write_text('host = "127.0.0.2"\nport = 9001\nmax_body_bytes = 5000\n')
    monkeypatch.setenv("MEDSERVE_PORT", "9002")
    s = load_settings(cfg, port=9003)
    assert (s.host, s.port, s.max_body_bytes) == ("127.0.0.2", 9003, 5000)
    assert load_settings(cfg).port == 9002


def test_config_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    cfg = tmp_path / "conf" / "medserve.toml"
    cfg.write_text('models_dir = "registry"\n[[models]]\nid = "m"\npath = "weights/m.gguf"\n')
    s = load_settings(cfg)
    assert s.models_dir == tmp_path / "conf" / "registry"
    assert llama(s.models[0]).path == tmp_path / "conf" / "weights" / "m.gguf"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("port = [", "not valid TOML"),
        ("port = 'eighty'", "invalid settings"),
        ("unknown_setting = 1", "invalid settings"),
    ],
)
def test_bad_config_file(tmp_path: Path, text: str, fragment: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        load_settings(cfg)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml")


def test_shipped_registry_has_the_default_model() -> None:
    specs = load_registry(ROOT / "models")
    default = next(s for s in specs if s.id == "smollm2-135m-instruct")
    assert default.replicas[0].engine == "llamacpp"
    assert llama(default).weights(default.id).name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert default.defaults.repeat_penalty > 1.0


def test_registry_relative_path_and_errors(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('id = "a"\npath = "a.gguf"\n')
    spec = load_registry(tmp_path)[0]
    assert llama(spec).path == tmp_path / "a.gguf"
    with pytest.raises(ConfigError, match="weights file not found"):
        llama(spec).weights(spec.id)
    (tmp_path / "b.toml").write_text('id = "b"\n')
    with pytest.raises(ConfigError, match="exactly one of"):
        load_registry(tmp_path)


def test_missing_package_names_the_fix() -> None:
    spec = flat_spec(id="x", package="no_such_model_package_here", file="m.gguf")
    with pytest.raises(ConfigError, match="not installed"):
        llama(spec).weights(spec.id)


@pytest.mark.parametrize(
    ("value", "model_id", "path"),
    [
        ("/m/Meditron-7B.Q4_K_M.gguf", "meditron-7b.q4_k_m", "/m/Meditron-7B.Q4_K_M.gguf"),
        ("triage=/m/x.gguf", "triage", "/m/x.gguf"),
    ],
)
def test_spec_from_cli(value: str, model_id: str, path: str) -> None:
    spec = spec_from_cli(value)
    assert (spec.id, llama(spec).path, llama(spec).engine) == (model_id, Path(path), "llamacpp")


def test_bad_model_ids_are_refused() -> None:
    with pytest.raises(ConfigError):
        spec_from_cli("bad id with spaces=/m/x.gguf")


def test_served_models_rejects_duplicates(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[models]]\nid = "a"\nengine = "fake"\n[[models]]\nid = "a"\nengine = "fake"\n')
    with pytest.raises(ConfigError, match="unique"):
        served_models(load_settings(cfg))


def test_served_models_empty_registry(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no models to serve"):
        served_models(load_settings(models_dir=tmp_path))


def test_tls_needs_both_files() -> None:
    with pytest.raises(ConfigError, match="tls_certfile and tls_keyfile"):
        load_settings(tls_certfile=Path("cert.pem"))


# (a registry file's text, the routing it gives, or the error that names the field)
ROUTING = [
    pytest.param('id = "a"\npath = "a.gguf"\n', (5.0, 3, "random"), id="defaults"),
    pytest.param(
        'id = "a"\npath = "a.gguf"\n[routing]\nhealth_interval_s = 1\neject_after = 2\n',
        (1.0, 2, "random"),
        id="flat form",
    ),
    pytest.param(
        'id = "a"\n[[replicas]]\nengine = "fake"\n[routing]\nbalance = "ordered"\n',
        (5.0, 3, "ordered"),
        id="general form",
    ),
    pytest.param(
        'id = "a"\npath = "a.gguf"\n[routing]\neject_after = 0\n',
        "routing.eject_after",
        id="out of range",
    ),
    pytest.param(
        'id = "a"\npath = "a.gguf"\n[routing]\nbalance = "round-robin"\n',
        "routing.balance",
        id="unknown balance",
    ),
    pytest.param(
        'id = "a"\npath = "a.gguf"\n[routing]\nretries = 3\n', "routing.retries", id="unknown key"
    ),
]


@pytest.mark.parametrize(("text", "expected"), ROUTING)
def test_routing_policy_per_model(
    tmp_path: Path, text: str, expected: tuple[float, int, str] | str
) -> None:
    (tmp_path / "a.toml").write_text(text)
    if isinstance(expected, str):
        with pytest.raises(ConfigError, match=expected):
            load_registry(tmp_path)
        return
    r = load_registry(tmp_path)[0].routing
    assert (r.health_interval_s, r.eject_after, r.balance) == expected


# (a registry file's text, the model's cache_isolation, or the error that names the field)
ISOLATION = [
    pytest.param('id = "a"\npath = "a.gguf"\n', "shared", id="default"),
    pytest.param('id = "a"\npath = "a.gguf"\ncache_isolation = "key"\n', "key", id="flat form"),
    pytest.param(
        'id = "a"\ncache_isolation = "shared"\n[[replicas]]\nengine = "fake"\n',
        "shared",
        id="general form",
    ),
    pytest.param(
        'id = "a"\npath = "a.gguf"\ncache_isolation = "tenant"\n',
        "cache_isolation",
        id="unknown policy",
    ),
    pytest.param(
        'id = "a"\ncache_isolation = true\n[[replicas]]\nengine = "fake"\n',
        "cache_isolation",
        id="not a policy name",
    ),
    pytest.param(
        'id = "a"\n[[replicas]]\nengine = "fake"\ncache_isolation = "key"\n',
        r"replicas\[0\].cache_isolation",
        id="on a replica, not the model",
    ),
]


@pytest.mark.parametrize(("text", "expected"), ISOLATION)
def test_cache_isolation_per_model(tmp_path: Path, text: str, expected: str) -> None:
    (tmp_path / "a.toml").write_text(text)
    if expected not in ("shared", "key"):
        with pytest.raises(ConfigError, match=expected):
            load_registry(tmp_path)
        return
    assert load_registry(tmp_path)[0].cache_isolation == expected


BAD_URLS = [  # (where the value comes from, setting, value); the password must not show
    ("file", "[audit]\nurl = '{url}'\n", "audit"),
    ("file", "[auth]\nurl = '{url}'\n", "auth"),
    ("env", "MEDSERVE_AUDIT__URL", "audit"),
    ("env", "MEDSERVE_AUTH__URL", "auth"),
]


@pytest.mark.parametrize(("source", "where", "section"), BAD_URLS)
def test_a_refused_database_url_is_named_not_echoed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, where: str, section: str
) -> None:
    url = "mysql://u:Pw7741zq@h/db"  # short: pydantic elides the middle of long values
    cfg = tmp_path / "medserve.toml"
    cfg.write_text(where.format(url=url) if source == "file" else "")
    if source == "env":
        monkeypatch.setenv(where, url)
    with pytest.raises(ConfigError) as caught:
        load_settings(cfg)
    # The error, and the one it replaced (kept as its context, shown by some log tools).
    text = "".join(traceback.format_exception(caught.value)) + str(caught.value.__context__)
    assert "postgresql://" in text and section in text
    assert "Pw7741zq" not in text
