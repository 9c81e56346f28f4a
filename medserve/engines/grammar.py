"""JSON schemas as llama.cpp grammars, and the schema features medserve can enforce.

The grammar comes from llama-cpp-python's own JSON-schema-to-GBNF converter
(``llama_cpp.llama_grammar.SchemaConverter``, the Python port of llama.cpp's). Read as it is
(llama-cpp-python 0.3.x), that converter enforces only some of JSON Schema and silently
drops the rest (it compiles ``{"type": "number", "maximum": 1}`` to any number), and gets a
few forms wrong. So a schema goes through two steps here:

1. :func:`_prepare` walks the schema and either refuses it (400 naming the KEYWORD, never a
   property name or value: they are client text that can name patient fields) or rewrites
   it into the forms the converter enforces exactly (keywords of other types than the one a
   subschema has are dropped: JSON Schema applies them to values of their type only);
2. :func:`_converter`, the library's converter with four fixes: integers with bounds
   (``minimum``/``maximum``/``exclusive*``: the library ignores them), JSON-valid string
   characters (the library's lets raw control characters into strings, which no JSON
   parser accepts), literals with backslashes (property names, ``const`` and ``enum``
   strings: the library does not escape ``\\``), and ``$ref`` names (the library names a
   referenced rule by the reference's last segment and takes any rule of that name, such as
   a property's or a primitive's, for the referenced one).

Enforced: ``type`` (one or a list), ``properties``, ``required``, ``additionalProperties``
(``false`` or a schema for maps; beside ``properties`` the grammar admits no other
property), ``items`` (schema or list), ``prefixItems``, ``minItems``, ``maxItems``,
``enum``, ``const``, ``anyOf``, ``allOf`` of one schema, local ``$ref`` (``#/...``,
recursion included) with ``$defs``/``definitions``, strings' ``minLength``/``maxLength``
and ``format`` date, time, date-time, uuid, integers' bounds, and numbers' inclusive
whole-number bounds (a confidence from 0 to 1; such numbers are written without exponent).
Refused (:data:`REFUSED` says why): ``oneOf``, ``not``, ``if``/``then``/``else``,
``pattern``, ``patternProperties``, ``uniqueItems``, ``multipleOf``, exclusive or
fractional number bounds, remote ``$ref`` and more.
Grammars are stricter than their schemas in ways that keep every output valid: properties
come in the schema's order, optional properties other than the listed ones never appear,
tuples have exactly their listed items, whitespace is at most one space.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from medserve.errors import InvalidRequestError

# Repetition bounds (minItems/maxItems/minLength/maxLength) above this are refused: the
# converter spells a bound of n as n nested optional items, so the grammar grows with n.
MAX_REPEAT = 1000
# Integer bounds: the converter's integers have at most 16 digits; bounds are clamped there.
MAX_DIGITS = 16
# Keywords that only annotate (never constrain) and may stand beside any form.
ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$comment",
        "$schema",
        "deprecated",
        "readOnly",
        "writeOnly",
        "$defs",
        "definitions",
    }
)
# Keywords the grammar cannot enforce, and why (the 400's message: keyword names only).
REFUSED = {
    "oneOf": "'oneOf' (exactly one alternative) cannot be enforced; use 'anyOf'",
    "not": "'not' cannot be enforced",
    "if": "'if'/'then'/'else' cannot be enforced",
    "then": "'if'/'then'/'else' cannot be enforced",
    "else": "'if'/'then'/'else' cannot be enforced",
    "pattern": "'pattern' (regular expressions) cannot be enforced",
    "patternProperties": "'patternProperties' cannot be enforced",
    "propertyNames": "'propertyNames' cannot be enforced",
    "minProperties": "'minProperties' cannot be enforced",
    "maxProperties": "'maxProperties' cannot be enforced",
    "dependentRequired": "'dependentRequired' cannot be enforced",
    "dependentSchemas": "'dependentSchemas' cannot be enforced",
    "dependencies": "'dependencies' cannot be enforced",
    "unevaluatedProperties": "'unevaluatedProperties' cannot be enforced",
    "unevaluatedItems": "'unevaluatedItems' cannot be enforced",
    "contains": "'contains' cannot be enforced",
    "minContains": "'minContains' cannot be enforced",
    "maxContains": "'maxContains' cannot be enforced",
    "multipleOf": "'multipleOf' cannot be enforced",
    "$dynamicRef": "'$dynamicRef' cannot be enforced",
    "$recursiveRef": "'$recursiveRef' cannot be enforced",
    "$anchor": "'$anchor' (references by anchor) cannot be enforced",
    "$dynamicAnchor": "'$dynamicAnchor' cannot be enforced",
    "$id": "'$id' inside a schema (a new base for references) cannot be enforced",
    # Annotations in JSON Schema, but a client that sends them expects encoded content.
    "contentEncoding": "'contentEncoding' cannot be enforced",
    "contentMediaType": "'contentMediaType' cannot be enforced",
    "contentSchema": "'contentSchema' cannot be enforced",
}
TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")
# Keywords by the type of value they constrain (JSON Schema applies them to that type only).
FAMILY = {
    "object": {"properties", "required", "additionalProperties"},
    "array": {"items", "prefixItems", "minItems", "maxItems", "uniqueItems", "additionalItems"},
    "string": {"minLength", "maxLength", "format"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
}
# Every keyword medserve reads or refuses by name; any other key of a subschema is refused
# without being named (a misspelt keyword would otherwise be silently dropped, and a key
# where a keyword belongs may be a property name: client text).
KNOWN = (
    ANNOTATIONS
    | REFUSED.keys()
    | {w for words in FAMILY.values() for w in words}
    | {"type", "enum", "const", "anyOf", "allOf", "$ref"}
)
# OpenAI's documented limits for structured outputs' schemas, which bound the grammar's
# size and its cost per sampled token (a 20,000-value enum took about 5 s a token here,
# on the scheduler's thread, stalling every request of the model): enum values in all,
# properties in all, and the characters of property names, definition names, enum and
# const string values together.
MAX_ENUM_VALUES = 1000
MAX_PROPERTIES = 5000
MAX_SCHEMA_CHARS = 120_000
FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4"})
# Any JSON value, in the form the converter turns into a union of its primitives.
ANY: dict[str, Any] = {"type": ["object", "array", "string", "number", "boolean", "null"]}
# A JSON string character: not a quote, backslash or control character (RFC 8259), or an
# escape. The library's version lets raw control characters through.
JSON_CHAR = (
    r'[^"\\\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])'
)


class _Refused(Exception):
    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def check_schema(schema: Any, param: str) -> None:
    """Raise :class:`medserve.errors.InvalidRequestError` (400, ``param``,
    code ``unsupported_schema``) when ``schema`` (a parsed JSON schema) uses a keyword or
    form the grammar cannot enforce, or does not compile. The message names the keyword,
    never a property name or value. Pure Python, about a millisecond for a form-sized
    schema (it compiles it to GBNF text and discards it)."""
    _compile(schema, param, ())


def json_schema_grammar(
    schema: str | None, *, prop_order: Sequence[str] = (), param: str = "response_format"
) -> str:
    """The GBNF grammar (llama.cpp's format, start rule ``root``) for a checked schema's
    JSON text, or for any JSON object when ``schema`` is None.

    ``prop_order``: property names that come first, in this order, wherever they appear
    (the tool-call envelope's ``name`` before ``arguments``); other properties keep the
    schema's order. Raises InvalidRequestError (``param``) for a schema
    :func:`check_schema` would refuse.
    """
    parsed = {"type": "object"} if schema is None else json.loads(schema)
    return _compile(parsed, param, prop_order)


def _compile(schema: Any, param: str, prop_order: Sequence[str]) -> str:
    try:
        if not isinstance(schema, dict):
            raise _Refused("the schema must be a JSON object")
        for key, value in schema.items():  # $id names the document: harmless at the root
            if key == "$id" and not isinstance(value, str):
                raise _Refused("'$id' must be a string")
        _limits(schema)
        root = _prepare({k: v for k, v in schema.items() if k != "$id"})
        _check_refs(root, root)
        converter = _converter({n: i for i, n in enumerate(prop_order)})
        converter.resolve_refs(root, "stdin")
        converter.visit(root, "")
        return str(converter.format_grammar())
    except _Refused as exc:
        raise InvalidRequestError(
            f"The JSON schema cannot be enforced: {exc.why}.",
            param=param,
            code="unsupported_schema",
        ) from None
    except RecursionError:
        raise InvalidRequestError(
            "The JSON schema is nested too deeply.", param=param, code="unsupported_schema"
        ) from None
    except Exception:
        # A converter failure carries schema text in its message: not forwarded.
        raise InvalidRequestError(
            "The JSON schema could not be compiled to a grammar.",
            param=param,
            code="unsupported_schema",
        ) from None


def _prepare(node: Any) -> dict[str, Any]:
    """``node`` rewritten into the forms :func:`_converter` enforces exactly; _Refused
    naming the keyword otherwise."""
    if node is True:
        return dict(ANY)
    if not isinstance(node, dict):
        raise _Refused("a subschema must be a JSON object or true")
    for key in node:
        if key in REFUSED:
            raise _Refused(REFUSED[key])
        if key not in KNOWN:
            raise _Refused("a subschema has a key that is no JSON Schema keyword medserve knows")
    out: dict[str, Any] = {}
    for defs in ("$defs", "definitions"):
        if defs in node:
            if not isinstance(node[defs], dict):
                raise _Refused(f"'{defs}' must be an object")
            out[defs] = {k: _prepare(v) for k, v in node[defs].items()}
    keys = set(node) - ANNOTATIONS
    if "allOf" in node:
        parts = node["allOf"]
        if not isinstance(parts, list) or len(parts) != 1 or keys != {"allOf"}:
            raise _Refused("'allOf' is enforced only with one schema and nothing beside it")
        inner = _prepare(parts[0])
        if set(inner) & set(out):
            raise _Refused("'allOf' is enforced only with one schema and nothing beside it")
        return {**inner, **out}
    if "$ref" in node:
        ref = node["$ref"]
        if keys != {"$ref"}:
            raise _Refused("'$ref' is enforced only with nothing beside it but annotations")
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise _Refused("'$ref' must point into the same schema ('#/...')")
        if "~" in ref or "%" in ref:
            raise _Refused("'$ref' with escaped characters cannot be enforced")
        return {**out, "$ref": ref}
    if "anyOf" in node:
        alts = node["anyOf"]
        if keys != {"anyOf"}:
            raise _Refused("'anyOf' is enforced only with nothing beside it but annotations")
        if not isinstance(alts, list) or not alts:
            raise _Refused("'anyOf' must be a non-empty list")
        return {**out, "anyOf": [_prepare(a) for a in alts]}
    kind = node.get("type")
    if "const" in node:
        return {**out, "const": node["const"]}
    if "enum" in node:
        values = node["enum"]
        if not isinstance(values, list) or not values:
            raise _Refused("'enum' must be a non-empty list")
        if kind is not None:
            kinds = kind if isinstance(kind, list) else [kind]
            values = [v for v in values if any(_is(v, k) for k in kinds)]
            if not values:
                raise _Refused("no 'enum' value has the schema's 'type'")
        return {**out, "enum": values}
    if isinstance(kind, list):
        if not kind or any(k not in TYPES for k in kind):
            raise _Refused("'type' names an unknown type")
        rest = {k: v for k, v in node.items() if k not in ("type", "$defs", "definitions")}
        return {**out, "anyOf": [_typed(k, rest) for k in dict.fromkeys(kind)]}
    if kind is None:
        families = [f for f, words in FAMILY.items() if keys & words]
        if not families:
            return {**out, **ANY}
        if len(families) > 1:
            raise _Refused("keywords of several types need a 'type'")
        kind = families[0]
    if kind not in TYPES:
        raise _Refused("'type' names an unknown type")
    return {**out, **_typed(kind, node)}


def _limits(schema: Any) -> None:
    """_Refused when the schema passes one of OpenAI's limits (MAX_ENUM_VALUES,
    MAX_PROPERTIES, MAX_SCHEMA_CHARS), counted over every subschema (annotations'
    values, such as ``default`` or ``examples``, are not subschemas and are skipped)."""
    values = properties = chars = 0
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            if key in ("enum", "const"):
                listed = value if key == "enum" and isinstance(value, list) else [value]
                values += len(listed)
                chars += sum(len(v) for v in listed if isinstance(v, str))
            elif key in ("properties", "$defs", "definitions") and isinstance(value, dict):
                properties += len(value) if key == "properties" else 0
                chars += sum(len(name) for name in value)
                stack.extend(value.values())
            elif key not in ANNOTATIONS:
                stack.append(value)
    if values > MAX_ENUM_VALUES:
        raise _Refused(f"more than {MAX_ENUM_VALUES} 'enum'/'const' values in all")
    if properties > MAX_PROPERTIES:
        raise _Refused(f"more than {MAX_PROPERTIES} properties in all")
    if chars > MAX_SCHEMA_CHARS:
        raise _Refused(
            f"property names, definition names and 'enum'/'const' strings of more than "
            f"{MAX_SCHEMA_CHARS} characters in all"
        )


def _typed(kind: str, node: dict[str, Any]) -> dict[str, Any]:
    """A subschema of one ``type``: its keywords for that type, checked."""
    if kind == "object":
        return _object(node)
    if kind == "array":
        return _array(node)
    if kind == "string":
        return _string(node)
    if kind == "integer":
        return _integer(node)
    if kind == "number":
        return _number(node)
    return {"type": kind}


def _number(node: dict[str, Any]) -> dict[str, Any]:
    """Numbers: inclusive bounds that are whole numbers (``0``..``1``, ``minimum: 0``) are
    enforced; exclusive or fractional ones are refused."""
    if "multipleOf" in node:
        raise _Refused(REFUSED["multipleOf"])
    out: dict[str, Any] = {"type": "number"}
    for word in ("exclusiveMinimum", "exclusiveMaximum"):
        if word in node:
            raise _Refused(f"'{word}' on a non-integer number cannot be enforced")
    for word in ("minimum", "maximum"):
        if word not in node:
            continue
        value = _finite(word, node[word])
        if value != int(value) or abs(value) >= 10**MAX_DIGITS:
            raise _Refused(f"a fractional '{word}' on a non-integer number cannot be enforced")
        out[word] = int(value)
    if out.get("minimum", -math.inf) > out.get("maximum", math.inf):
        raise _Refused("no number lies between 'minimum' and 'maximum'")
    return out


def _object(node: dict[str, Any]) -> dict[str, Any]:
    props = node.get("properties", {})
    if not isinstance(props, dict):
        raise _Refused("'properties' must be an object")
    required = node.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise _Refused("'required' must be a list of names")
    if any(r not in props for r in required):
        raise _Refused("'required' names a property without a schema in 'properties'")
    extra = node.get("additionalProperties", True)
    if props:
        # Other properties are never generated: stricter than the schema, always valid.
        return {
            "type": "object",
            "properties": {k: _prepare(v) for k, v in props.items()},
            "required": list(dict.fromkeys(required)),
        }
    if extra is False:
        return {"type": "object", "properties": {}}
    if extra is True:
        return {"type": "object"}
    return {"type": "object", "additionalProperties": _prepare(extra)}


def _array(node: dict[str, Any]) -> dict[str, Any]:
    if node.get("uniqueItems", False) is not False:
        raise _Refused("'uniqueItems' cannot be enforced")
    low, high = node.get("minItems", 0), node.get("maxItems")
    _bound("minItems", low)
    if high is not None:
        _bound("maxItems", high)
        if high < low:
            raise _Refused("'maxItems' is below 'minItems'")
    tuple_ = node.get("prefixItems")
    items = node.get("items")
    if isinstance(items, list):
        tuple_, items = items, None
    if tuple_ is not None:
        if not isinstance(tuple_, list) or not tuple_:
            raise _Refused("'prefixItems' must be a non-empty list")
        # Exactly the listed items are generated: fine unless the bounds need another count.
        if low > len(tuple_) or (high is not None and high < len(tuple_)):
            raise _Refused("'minItems'/'maxItems' beside 'prefixItems' need other counts")
        return {"type": "array", "prefixItems": [_prepare(s) for s in tuple_]}
    if items is None and low == 0 and high is None:
        return {"type": "array"}
    out: dict[str, Any] = {"type": "array", "items": _prepare(True if items is None else items)}
    if low:
        out["minItems"] = low
    if high is not None:
        out["maxItems"] = high
    return out


def _string(node: dict[str, Any]) -> dict[str, Any]:
    low, high = node.get("minLength", 0), node.get("maxLength")
    _bound("minLength", low)
    if high is not None:
        _bound("maxLength", high)
        if high < low:
            raise _Refused("'maxLength' is below 'minLength'")
    if "format" in node:
        if node["format"] not in FORMATS:
            raise _Refused("this 'format' cannot be enforced (date, time, date-time, uuid can)")
        if "minLength" in node or "maxLength" in node:
            raise _Refused("'minLength'/'maxLength' beside 'format' cannot be enforced")
        return {"type": "string", "format": node["format"]}
    out: dict[str, Any] = {"type": "string"}
    if low:
        out["minLength"] = low
    if high is not None:
        out["maxLength"] = high
    return out


def _integer(node: dict[str, Any]) -> dict[str, Any]:
    if "multipleOf" in node:
        raise _Refused(REFUSED["multipleOf"])
    low: int | None = None
    high: int | None = None
    for word in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        if word not in node:
            continue
        value = _finite(word, node[word])
        if word == "minimum":
            bound = math.ceil(value)
        elif word == "exclusiveMinimum":
            bound = math.floor(value) + 1
        elif word == "maximum":
            bound = math.floor(value)
        else:
            bound = math.ceil(value) - 1
        if word.endswith("inimum"):
            low = bound if low is None else max(low, bound)
        else:
            high = bound if high is None else min(high, bound)
    if low is not None and high is not None and high < low:
        raise _Refused("no integer lies between 'minimum' and 'maximum'")
    top = 10**MAX_DIGITS - 1
    if (low is not None and low > top) or (high is not None and high < -top):
        raise _Refused(f"integer bounds beyond {MAX_DIGITS} digits cannot be enforced")
    out: dict[str, Any] = {"type": "integer"}
    if low is not None:
        out["minimum"] = low
    if high is not None:
        out["maximum"] = high
    return out


def _finite(word: str, value: Any) -> int | float:
    """A numeric keyword's value, which must be a finite JSON number (not a boolean)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _Refused(f"'{word}' must be a number")
    return value


def _bound(word: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Refused(f"'{word}' must be a non-negative integer")
    if value > MAX_REPEAT:
        raise _Refused(f"'{word}' above {MAX_REPEAT} cannot be enforced")


def _is(value: Any, kind: str) -> bool:
    """Whether a JSON value has JSON Schema type ``kind``."""
    if kind == "integer":
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            or (isinstance(value, float) and value.is_integer())
        )
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    names: dict[str, type | tuple[type, ...]] = {
        "object": dict,
        "array": list,
        "string": str,
        "boolean": bool,
        "null": type(None),
    }
    return kind in names and isinstance(value, names[kind])


def _pointer(root: dict[str, Any], ref: str) -> dict[str, Any]:
    """The subschema a local ``$ref`` names; _Refused when it names none."""
    node: Any = root
    for part in ref[1:].split("/")[1:]:
        if not isinstance(node, dict) or part not in node:
            raise _Refused("a '$ref' does not resolve")
        node = node[part]
    if not isinstance(node, dict):
        raise _Refused("a '$ref' does not resolve to a schema")
    return node


def _check_refs(node: Any, root: dict[str, Any]) -> None:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            _pointer(root, node["$ref"])
        for value in node.values():
            _check_refs(value, root)
    elif isinstance(node, list):
        for value in node:
            _check_refs(value, root)


def _digits_range(low: str, high: str) -> list[str]:
    """GBNF sequences matching exactly the decimal strings of one length from ``low`` to
    ``high`` (equal lengths, ``low <= high``)."""
    if not low:
        return [""]
    if low[0] == high[0]:
        return [f'"{low[0]}" {rest}'.strip() for rest in _digits_range(low[1:], high[1:])]
    n = len(low) - 1
    tail = " [0-9]" * n
    if low[1:] == "0" * n and high[1:] == "9" * n:
        return [f"[{low[0]}-{high[0]}]{tail}"]
    out = [f'"{low[0]}" {r}'.strip() for r in _digits_range(low[1:], "9" * n)]
    if int(high[0]) - int(low[0]) > 1:
        out.append(f"[{int(low[0]) + 1}-{int(high[0]) - 1}]{tail}")
    out += [f'"{high[0]}" {r}'.strip() for r in _digits_range("0" * n, high[1:])]
    return out


def _natural_range(low: int, high: int | None) -> list[str]:
    """GBNF alternatives for the integers ``low``..``high`` (0 <= low, high None: up to
    :data:`MAX_DIGITS` digits), written without leading zeros."""
    top = 10**MAX_DIGITS - 1
    high = top if high is None else min(high, top)
    out: list[str] = []
    for width in range(len(str(low)), len(str(high)) + 1):
        start = max(low, 10 ** (width - 1) if width > 1 else 0)
        end = min(high, 10**width - 1)
        if start <= end:
            out += _digits_range(str(start).zfill(width), str(end).zfill(width))
    return out


def integer_rule(low: int | None, high: int | None) -> str:
    """A GBNF expression for the integers from ``low`` to ``high`` (None: unbounded, up to
    :data:`MAX_DIGITS` digits), as JSON writes them (no leading zeros, no ``-0``)."""
    alts: list[str] = []
    if low is None or low < 0:
        # Negative part: -magnitude for magnitudes max(1, -high)..-low.
        least = 1 if high is None or high >= 0 else -high
        most = None if low is None else -low
        alts += [f'"-" {a}' for a in _natural_range(least, most)]
    if high is None or high >= 0:
        alts += _natural_range(max(low or 0, 0), high)
    return "(" + " | ".join(alts) + ")"


def number_rule(low: int | None, high: int | None) -> str:
    """A GBNF expression for the decimal numbers from ``low`` to ``high`` (whole-number
    bounds; None: unbounded), without exponents: an integer part in range with any
    fraction (rule ``decimal-part``), or a bound itself with a fraction of zeros."""
    frac = '("." decimal-part)?'
    zero = '("." "0")?'
    alts: list[str] = []

    def side(least: int, most: int | None, sign: str) -> None:
        # Magnitudes from least (any fraction) up to most (whole, zero fraction only).
        if most is None:
            alts.extend(f"{sign}{a} {frac}" for a in _natural_range(least, None))
            return
        if most > least:
            alts.extend(f"{sign}{a} {frac}" for a in _natural_range(least, most - 1))
        alts.append(f'{sign}"{most}" {zero}')

    if high is None or high >= 0:
        side(max(low or 0, 0), high, "")
    if low is None or low < 0:
        # -(n + f): n + f within [max(0, -high), -low]; "-0..." only when 0 is in range.
        side(0 if high is None or high >= 0 else -high, None if low is None else -low, '"-" ')
    return "(" + " | ".join(alts) + ")"


def _converter(prop_order: dict[str, int]) -> Any:
    """llama-cpp-python's converter with the fixes the module docstring lists (imported
    here: importing llama_cpp loads llama.cpp's library, which the web layer never needs)."""
    from llama_cpp import llama_grammar
    from llama_cpp.llama_grammar import PRIMITIVE_RULES, RESERVED_NAMES, BuiltinRule

    base: Any = llama_grammar.SchemaConverter  # untyped

    class Converter(base):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(
                prop_order=prop_order, allow_fetch=False, dotall=False, raw_pattern=False
            )
            self._ref_rules: dict[str, str] = {}

        def visit(self, schema: dict[str, Any], name: str) -> str:
            bounded = "minimum" in schema or "maximum" in schema
            if schema.get("type") in ("integer", "number") and bounded:
                rule = name + "-" if name in RESERVED_NAMES else name or "root"
                low, high = schema.get("minimum"), schema.get("maximum")
                if schema["type"] == "integer":
                    expr = integer_rule(low, high)
                else:
                    self._add_primitive("decimal-part", PRIMITIVE_RULES["decimal-part"])
                    expr = number_rule(low, high)
                return str(self._add_rule(rule, f"{expr} space"))
            return str(super().visit(schema, name))

        def _add_primitive(self, name: str, rule: Any) -> str:
            if rule is PRIMITIVE_RULES["char"]:
                rule = BuiltinRule(JSON_CHAR, [])
            return str(super()._add_primitive(name, rule))

        def _format_literal(self, literal: str) -> str:
            escaped = (
                literal.replace("\\", "\\\\")
                .replace('"', '\\"')
                .replace("\n", "\\n")
                .replace("\r", "\\r")
            )
            return f'"{escaped}"'

        def resolve_refs(self, schema: dict[str, Any], url: str) -> dict[str, Any]:
            # Every local $ref made absolute and its target recorded (the library's skips
            # references inside a node that has one, such as $defs beside a root $ref).
            def visit(node: Any) -> None:
                if isinstance(node, dict):
                    ref = node.get("$ref")
                    if isinstance(ref, str) and ref.startswith("#"):
                        node["$ref"] = url + ref
                        self._refs[url + ref] = _pointer(schema, ref)
                    for value in node.values():
                        visit(value)
                elif isinstance(node, list):
                    for value in node:
                        visit(value)

            visit(schema)
            return schema

        def _resolve_ref(self, ref: str) -> str:
            name = self._ref_rules.get(ref)
            if name is None:
                i = len(self._ref_rules)
                while f"ref{i}" in self._rules:
                    i += 1
                name = self._ref_rules[ref] = f"ref{i}"
                self._rules[name] = "space"  # reserved (recursion sees the name), replaced:
                self._rules[name] = self.visit(self._refs[ref], f"{name}-body")
            return name

    return Converter()
