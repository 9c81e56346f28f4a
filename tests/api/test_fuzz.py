"""Fuzz every operation of the OpenAPI schema (bounded, in process): never a 5xx.

Valid and invalid bodies, strange strings, huge numbers: whatever a client sends, the
answer is a 2xx or a 4xx in the OpenAI envelope, never a server error. schemathesis is
used as a library (its pytest plugin does not support pytest 9).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from medserve.api.app import create_app
from medserve.config import AuditSettings, AuthSettings, Settings
from medserve.router import Router
from tests.conftest import AUTH, DEV_KEY, fake_spec

EXAMPLES = 60  # per operation


def test_no_input_makes_a_server_error(tmp_path: Path) -> None:
    conf = Settings(
        audit=AuditSettings(path=tmp_path / "fuzz" / "audit.db"),
        auth=AuthSettings(keys_path=tmp_path / "keys.db", dev_key=DEV_KEY),
    )
    app = create_app(conf, Router.from_specs([fake_spec(context_length=512)]))
    # schemathesis runs the app's lifespan itself (engine loaded, audit log open).
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=AUTH)
    operations: list[Any] = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert {op.label for op in operations} >= {
        "POST /v1/chat/completions",
        "POST /v1/completions",
        "GET /v1/models",
    }
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,  # the same examples every run: a failure reproduces
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def call(case: Any) -> None:
            if isinstance(case.body, dict):
                # A served model, so the rest of the body is what gets explored (unknown
                # models are a 404 before anything else is read).
                case.body["model"] = "fake-echo"
            case.call_and_validate(headers=AUTH, checks=[not_a_server_error])

        try:
            call()
        except Exception as exc:
            pytest.fail(f"{operation.label}: {exc}")
