"""Offline environment and the whitelisting JSON log formatter."""

from __future__ import annotations

import json
import logging

from medserve.logs import JsonFormatter
from medserve.privacy import OFFLINE_ENV, apply_offline_env
from tests.conftest import SECRET


def test_offline_env_is_forced() -> None:
    env = {"HF_HUB_OFFLINE": "0", "PATH": "/bin"}
    changed = apply_offline_env(env)
    assert changed == {"HF_HUB_OFFLINE": "0"}
    assert all(env[k] == v for k, v in OFFLINE_ENV.items())
    assert env["PATH"] == "/bin"
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "VLLM_NO_USAGE_STATS", "DO_NOT_TRACK"):
        assert env[key] == "1"


def test_formatter_keeps_only_whitelisted_fields() -> None:
    record = logging.LogRecord("medserve.x", logging.INFO, __file__, 1, "request", None, None)
    record.request_id = "abc"
    record.status = 200
    record.prompt = SECRET  # a careless extra: must not be written
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "abc"
    assert line["status"] == 200
    assert line["msg"] == "request"
    assert SECRET not in json.dumps(line)


def test_exceptions_are_logged_without_their_message() -> None:
    try:
        raise RuntimeError(f"could not parse {SECRET}")
    except RuntimeError:
        import sys

        record = logging.LogRecord(
            "medserve.x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info()
        )
    line = json.loads(JsonFormatter().format(record))
    assert line["exc_type"] == "builtins.RuntimeError"
    assert "test_exceptions_are_logged_without_their_message" in line["traceback"]
    assert SECRET not in json.dumps(line)


def test_configure_sets_medserve_level_and_keeps_libraries_at_warning() -> None:
    from medserve import logs

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure("debug")
        # A library's DEBUG lines may quote what it handles (a request, a chunk of text).
        assert not logging.getLogger("httpx").isEnabledFor(logging.DEBUG)
        assert logging.getLogger("medserve.api").isEnabledFor(logging.DEBUG)
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
        logging.getLogger("medserve").setLevel(logging.NOTSET)
