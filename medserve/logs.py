"""One JSON object per log line, with only whitelisted fields.

Fields come from a fixed list, never from arbitrary ``extra`` keys, so a future log call
that passes a prompt or a completion by mistake still cannot write it. Exceptions are
logged as their type and stack frames, without their message: a library error can quote
its input, and that input may be patient text.
"""

from __future__ import annotations

import json
import logging
import time
import traceback

FIELDS = (
    "request_id",
    "method",
    "route",
    "status",
    "duration_ms",
    "model",
    "replica",
    "prompt_tokens",
    "completion_tokens",
    "finish_reason",
    "error",
    "event",
    "count",
    "path",
    "n_ctx",
    "threads",
    "host",
    "port",
)


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...whitelisted extras, "exc"}``."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for field in FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                line[field] = value
        if record.exc_info and record.exc_info[0] is not None:
            kind, _, tb = record.exc_info
            line["exc_type"] = f"{kind.__module__}.{kind.__qualname__}"
            line["traceback"] = "".join(traceback.format_tb(tb))
        return json.dumps(line, ensure_ascii=False)


def configure(level: str) -> None:
    """Send medserve's and uvicorn's logs to stderr as JSON lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("medserve").setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
        logging.getLogger(name).setLevel(logging.INFO)
