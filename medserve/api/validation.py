"""FastAPI's validation errors (its 422) as OpenAI's 400, without a word of client text.

pydantic's own messages and locations may hold what the client sent: a message can quote
the input, and a location holds the keys of any dictionary in the body. So the parameter
is built from the schema's field names and list indexes only (everything else in a
location is dropped: union branch labels, dictionary keys), and the message from the
error's ``type`` and the limits in its ``ctx``, which come from medserve's own schema.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi.exceptions import RequestValidationError

from medserve.api.protocol import field_names
from medserve.errors import InvalidRequestError

# pydantic's type errors, and what the field expected instead.
EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "none_required": "null",
}
# Messages for the other errors; ``{...}`` are filled from the error's ctx (schema limits).
MESSAGES = {
    "unicode": "the text is not valid Unicode (it holds an unpaired surrogate escape)",
    "string_unicode": "the text is not valid Unicode (it holds an unpaired surrogate escape)",
    "literal_error": "must be one of {expected}",
    "greater_than_equal": "must be at least {ge}",
    "greater_than": "must be greater than {gt}",
    "less_than_equal": "must be at most {le}",
    "less_than": "must be less than {lt}",
    "too_short": "must hold at least {min_length} item(s)",
    "too_long": "must hold at most {max_length} items",
    "string_too_short": "must be at least {min_length} character(s) long",
    "string_too_long": "must be at most {max_length} characters long",
    "finite_number": "must be a finite number",
    "string_pattern_mismatch": "must match {pattern}",
    "logit_bias_key": "its keys must be token ids (decimal integers as strings)",
    "logit_bias_value": "its values must be numbers from -100 to 100",
}
LOCATIONS = {"body", "path", "query", "header", "cookie"}


def validation_error(exc: RequestValidationError) -> InvalidRequestError:
    """The 400 for ``exc``: names the first bad parameter and its limit, never its value."""
    errors = [e for e in exc.errors() if isinstance(e, dict)]
    if not errors:
        return InvalidRequestError("The request body is invalid.")
    if any(e.get("type") == "json_invalid" for e in errors):
        return InvalidRequestError("The request body is not valid JSON.")
    # A value that matched no branch of a union gives one error per branch. The useful
    # one is the branch whose type matched (a limit, not a type error), and the deepest.
    first = max(errors, key=lambda e: (_kind(e) not in EXPECTED, len(_path(e))))
    param = _param(_path(first))
    if param is None:
        return InvalidRequestError("The request body must be a JSON object.")
    kind = _kind(first)
    if kind == "missing":
        return InvalidRequestError(f"Missing required parameter: '{param}'.", param=param)
    if kind in EXPECTED:
        same = [e for e in errors if _param(_path(e)) == param and _kind(e) in EXPECTED]
        wanted = list(dict.fromkeys(EXPECTED[_kind(e)] for e in same))
        return InvalidRequestError(
            f"Invalid type for '{param}': expected {' or '.join(wanted)}, "
            f"but got {_json_type(first.get('input'))} instead.",
            param=param,
        )
    template = MESSAGES.get(kind)
    ctx = {k: _number(v) for k, v in (first.get("ctx") or {}).items()}
    try:
        detail = template.format(**ctx) if template else None
    except (KeyError, IndexError, ValueError):
        detail = None
    if detail is None:
        return InvalidRequestError(f"Invalid value for '{param}'.", param=param)
    return InvalidRequestError(f"Invalid value for '{param}': {detail}.", param=param)


def _kind(error: dict[str, Any]) -> str:
    return str(error.get("type", ""))


def _path(error: dict[str, Any]) -> list[str | int]:
    """The location as schema names and list indexes only; the leading "body" dropped."""
    loc: Sequence[Any] = error.get("loc", ())
    if loc and loc[0] in LOCATIONS:
        loc = loc[1:]
    names = field_names()
    return [p for p in loc if (isinstance(p, int) and not isinstance(p, bool)) or p in names]


def _param(path: list[str | int]) -> str | None:
    """``messages[0].content[1].text``: OpenAI's way of naming a nested parameter."""
    if not path:
        return None
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _number(value: Any) -> Any:
    """A limit as a person writes it: 2 rather than 2.0. Non-numbers pass unchanged (the
    ctx of the errors in MESSAGES only ever holds schema values)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _json_type(value: Any) -> str:
    """The JSON type of a submitted value: its kind, never its content."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    return "an object"
