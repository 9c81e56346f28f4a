"""JSON schema → llama.cpp grammar: every supported keyword is enforced by the generated
grammar, every refused one is named in the 400 (and no property name or value is).

Grammars are run through llama.cpp's own grammar engine (the grammar sampler the
scheduler uses) over SmolLM2's vocabulary, loaded without its weights: a text is accepted
when each of its tokens is allowed in turn and end-of-generation is allowed after it.
"""

from __future__ import annotations

import ctypes
import json
import math
from collections.abc import Iterator
from typing import Any

import pytest

from medserve.engines.grammar import check_schema, integer_rule, json_schema_grammar
from medserve.errors import InvalidRequestError
from tests.conftest import SECRET, smollm2_path


class Recognizer:
    """llama.cpp's grammar engine over a vocabulary (weights not loaded)."""

    def __init__(self) -> None:
        import llama_cpp

        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self.model = llama_cpp.llama_model_load_from_file(str(smollm2_path()).encode(), params)
        assert self.model
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.eos = llama_cpp.llama_vocab_eos(self.vocab)

    def close(self) -> None:
        import llama_cpp

        llama_cpp.llama_model_free(self.model)

    def tokens(self, text: str) -> list[int]:
        import llama_cpp

        data = text.encode()
        buf = (llama_cpp.llama_token * (len(data) + 8))()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, len(buf), False, False)
        assert n >= 0
        return list(buf[:n])

    def allowed(self, sampler: Any, token: int) -> bool:
        import llama_cpp

        one = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 0.0, 0.0))
        cur = llama_cpp.llama_token_data_array(one, 1, -1, False)
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(cur))
        return bool(math.isfinite(one[0].logit))

    def accepts(self, grammar: str, text: str) -> bool:
        """Whether ``text`` is a complete sentence of ``grammar``."""
        import llama_cpp

        sampler = llama_cpp.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        assert sampler, "llama.cpp could not parse the grammar"
        try:
            for token in self.tokens(text):
                if not self.allowed(sampler, token):
                    return False
                llama_cpp.llama_sampler_accept(sampler, token)
            return self.allowed(sampler, self.eos)
        finally:
            llama_cpp.llama_sampler_free(sampler)


@pytest.fixture(scope="module")
def recognizer() -> Iterator[Recognizer]:
    r = Recognizer()
    yield r
    r.close()


TREE = {
    "$defs": {
        "Node": {
            "type": "object",
            "properties": {
                "v": {"type": "integer"},
                "kids": {"type": "array", "items": {"$ref": "#/$defs/Node"}},
            },
            "required": ["v", "kids"],
        }
    },
    "$ref": "#/$defs/Node",
}

# (what is enforced, schema, texts it accepts, texts it refuses: each refused one is
# invalid under the schema, or not JSON)
ENFORCED: list[tuple[str, dict[str, Any] | None, list[str], list[str]]] = [
    ("json_object", None, ['{"a": [1, {"b": null}]}', "{}"], ["[1]", '"x"', "{}x", "{"]),
    (
        "properties+required",
        {
            "type": "object",
            "properties": {"a": {"type": "string"}, "b": {"type": "integer"}},
            "required": ["a"],
        },
        ['{"a": "x"}', '{"a":"x","b":2}'],
        ['{"b": 2}', '{"a": 1}', '{"a": "x", "c": 1}', '{"a": "x"} {}'],
    ),
    (
        "minimum+maximum",
        {"type": "integer", "minimum": -3, "maximum": 12},
        ["-3", "0", "7", "12"],
        ["-4", "13", "1.5", "007", "120"],
    ),
    (
        "exclusiveMinimum+exclusiveMaximum",
        {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10},
        ["1", "9"],
        ["0", "10", "-1"],
    ),
    ("minimum", {"type": "integer", "minimum": 100}, ["100", "5000"], ["99", "-1", "0"]),
    ("maximum", {"type": "integer", "maximum": -10}, ["-10", "-999"], ["-9", "0", "5"]),
    ("enum", {"enum": ["a", 1, None]}, ['"a"', "1", "null"], ['"b"', "2", "true"]),
    (
        "enum of tricky strings",
        {"enum": ["back\\slash", 'quo"te', "new\nline", "é"]},
        [json.dumps(v) for v in ["back\\slash", 'quo"te', "new\nline", "é"]],
        ['"back\\slash"', '"new\nline"', '"quo"te"'],
    ),
    (
        "const",
        {"const": {"k": [1, 'x"y']}},
        [json.dumps({"k": [1, 'x"y']})],
        ['{"k": [2, "x\\"y"]}', "{}"],
    ),
    (
        "tricky property names",
        {
            "type": "object",
            "properties": {'q"\\\n': {"type": "boolean"}},
            "required": ['q"\\\n'],
        },
        [json.dumps({'q"\\\n': True})],
        ['{"q\\"\\\n": true}', "{}"],
    ),
    (
        "minLength+maxLength",
        {"type": "string", "minLength": 2, "maxLength": 3},
        ['"ab"', '"abc"', '"\\n\\u00e9"'],
        ['"a"', '"abcd"', '""'],
    ),
    ("string characters", {"type": "string"}, ['"a\\nb"', '"tab\\t"'], ['"a\nb"', '"a\x01"']),
    (
        "format date",
        {"type": "string", "format": "date"},
        ['"2024-01-31"'],
        ['"2024-13-01"', '"x"'],
    ),
    (
        "format uuid",
        {"type": "string", "format": "uuid"},
        ['"123e4567-e89b-12d3-a456-426614174000"'],
        ['"123e4567"'],
    ),
    (
        "items+minItems+maxItems",
        {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 2},
        ["[true]", "[true, false]"],
        ["[]", "[true, true, true]", "[1]"],
    ),
    (
        "minItems without items",
        {"type": "array", "minItems": 2},
        ['[1, "a"]', "[null, {}, []]"],
        ["[]", "[1]"],
    ),
    (
        "prefixItems",
        {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}]},
        ['[1, "a"]'],
        ['["a", 1]', "[1]"],
    ),
    (
        "anyOf",
        {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        ["1", "null"],
        ['"x"', "true"],
    ),
    (
        "type list",
        {"type": ["string", "null"], "maxLength": 1},
        ['"a"', "null"],
        ['"ab"', "1"],
    ),
    (
        "recursive $ref",
        TREE,
        ['{"v": 1, "kids": [{"v": 2, "kids": []}]}'],
        ['{"v": "x", "kids": []}', '{"v": 1}'],
    ),
    (
        "$ref named like a property",
        {
            "type": "object",
            "properties": {
                "Item": {"type": "string"},
                "list": {"type": "array", "items": {"$ref": "#/$defs/Item"}},
            },
            "required": ["Item", "list"],
            "$defs": {"Item": {"type": "integer"}},
        },
        ['{"Item": "a", "list": [1]}'],
        ['{"Item": "a", "list": ["a"]}'],
    ),
    (
        "$ref named like a primitive",
        {
            "type": "array",
            "items": {"$ref": "#/definitions/string"},
            "definitions": {"string": {"type": "integer"}},
        },
        ["[1, 2]"],
        ['["a"]'],
    ),
    (
        "additionalProperties schema",
        {"type": "object", "additionalProperties": {"type": "integer"}},
        ['{"x": 1, "y": 2}', "{}"],
        ['{"x": "a"}'],
    ),
    (
        "additionalProperties false",
        {"type": "object", "additionalProperties": False},
        ["{}"],
        ['{"x": 1}'],
    ),
    (
        "allOf of one",
        {"allOf": [{"type": "integer", "maximum": 3}], "description": "d"},
        ["3"],
        ["4", '"a"'],
    ),
    ("boolean", {"type": "boolean"}, ["true", "false"], ["1", "null"]),
    ("number", {"type": "number"}, ["1.5", "-2e3", "0"], ['"1"', "01"]),
    (
        "number minimum+maximum",
        {"type": "number", "minimum": 0, "maximum": 1},
        ["0", "1", "0.75", "1.0", "0.0"],
        ["1.5", "-0.1", "2", "1.01"],
    ),
    (
        "number minimum",
        {"type": "number", "minimum": -2},
        ["-2", "-1.5", "3.25", "100"],
        ["-2.5", "-3"],
    ),
    ("number maximum", {"type": "number", "maximum": -1}, ["-1", "-1.5", "-20"], ["-0.5", "0"]),
]


@pytest.mark.parametrize(
    ("schema", "good", "bad"), [c[1:] for c in ENFORCED], ids=[c[0] for c in ENFORCED]
)
def test_grammar_enforces(
    recognizer: Recognizer, schema: dict[str, Any] | None, good: list[str], bad: list[str]
) -> None:
    grammar = json_schema_grammar(None if schema is None else json.dumps(schema))
    if schema is not None:
        check_schema(schema, "response_format")
    for text in good:
        json.loads(text)  # the table's own check
        assert recognizer.accepts(grammar, text), text
    for text in bad:
        assert not recognizer.accepts(grammar, text), text


@pytest.mark.parametrize(("low", "high"), [(-15, 7), (0, 0), (3, 250), (-120, -7), (95, 1005)])
def test_integer_ranges_exactly(recognizer: Recognizer, low: int, high: int) -> None:
    grammar = f"root ::= {integer_rule(low, high)}"
    for n in range(low - 30, high + 31):
        assert recognizer.accepts(grammar, str(n)) == (low <= n <= high), n


@pytest.mark.parametrize(("low", "high"), [(0, 1), (-3, 2), (-5, -2), (2, 12)])
def test_number_ranges_exactly(recognizer: Recognizer, low: int, high: int) -> None:
    grammar = json_schema_grammar(json.dumps({"type": "number", "minimum": low, "maximum": high}))
    for k in range(4 * (low - 3), 4 * (high + 3) + 1):
        x = k / 4
        for text in {str(x), f"{x:g}"} - {"-0.0", "-0"}:  # (negative zero: not generated)
            assert recognizer.accepts(grammar, text) == (low <= x <= high), text


def secret(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` as the value of a property named with patient text."""
    return {"type": "object", "properties": {SECRET: schema}, "required": [SECRET]}


# (keyword the message must name, schema)
REFUSED: list[tuple[str, dict[str, Any]]] = [
    ("oneOf", {"oneOf": [{"type": "string"}, {"type": "integer"}]}),
    ("not", {"not": {"type": "string"}}),
    ("if", {"if": {"type": "string"}, "then": {"minLength": 2}}),
    ("pattern", {"type": "string", "pattern": f"^{SECRET}$"}),
    ("patternProperties", {"type": "object", "patternProperties": {SECRET: {}}}),
    ("propertyNames", {"type": "object", "propertyNames": {"maxLength": 3}}),
    ("minProperties", {"type": "object", "minProperties": 1}),
    ("maxProperties", {"type": "object", "maxProperties": 1}),
    ("dependentRequired", {"type": "object", "dependentRequired": {SECRET: ["b"]}}),
    ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}),
    ("contains", {"type": "array", "contains": {"const": SECRET}}),
    ("multipleOf", {"type": "integer", "multipleOf": 5}),
    ("minimum", {"type": "number", "minimum": 0.5}),
    ("maximum", {"type": "number", "maximum": 1.5}),
    ("exclusiveMinimum", {"type": "number", "exclusiveMinimum": 0}),
    ("$ref", {"$ref": "https://example.org/schema.json"}),
    ("$ref", {"$ref": "#/$defs/missing"}),
    ("$ref", {"$ref": "#/$defs/a", "type": "object", "$defs": {"a": {}}}),
    ("format", {"type": "string", "format": "email"}),
    ("allOf", {"allOf": [{"type": "object"}, {"required": [SECRET]}]}),
    ("anyOf", {"anyOf": [{"type": "string"}], "maxLength": 3}),
    ("required", {"type": "object", "required": [SECRET]}),
    ("maxItems", {"type": "array", "maxItems": 100000}),
    ("maxLength", {"type": "string", "maxLength": 100000}),
    ("unevaluatedProperties", {"type": "object", "unevaluatedProperties": False}),
    ("$id", {"properties": {"a": {"$id": "x"}}}),
    ("type", {"type": "date"}),
    ("type", {"minLength": 2, "minItems": 1}),
    ("contentEncoding", {"type": "string", "contentEncoding": "base64"}),
    ("contentMediaType", {"type": "string", "contentMediaType": "application/json"}),
    ("enum", {"enum": [f"v{i}" for i in range(1001)]}),
    ("enum", {"anyOf": [{"enum": [f"{SECRET}{i}"] * 2} for i in range(501)]}),
    ("const", {"type": "array", "prefixItems": [{"const": i} for i in range(1001)]}),
]


@pytest.mark.parametrize(
    ("keyword", "schema"), REFUSED, ids=[f"{k}-{i}" for i, (k, _) in enumerate(REFUSED)]
)
def test_refused_keyword_is_named_and_nothing_else(keyword: str, schema: dict[str, Any]) -> None:
    for candidate in (schema, secret(schema)):
        with pytest.raises(InvalidRequestError) as caught:
            check_schema(candidate, "response_format.json_schema.schema")
        err = caught.value
        assert err.param == "response_format.json_schema.schema"
        assert err.code == "unsupported_schema"
        assert f"'{keyword}'" in err.message
        assert SECRET not in err.message and "example.org" not in err.message


# (what the schema passes, schema); none may be named in the message: client text
UNNAMED: list[tuple[str, dict[str, Any]]] = [
    ("a misspelt keyword", {"type": "string", "maxLenght": 3}),
    ("a property name where a keyword goes", {"type": "object", SECRET: {"type": "string"}}),
    ("5001 properties", {"type": "object", "properties": {f"p{i}": {} for i in range(5001)}}),
    ("120,001 characters of names", {"type": "object", "properties": {"p" * 120_001: {}}}),
    ("120,001 characters of enum strings", {"enum": ["x" * 60_001, SECRET + "y" * 60_000]}),
]


@pytest.mark.parametrize(("schema",), [(c[1],) for c in UNNAMED], ids=[c[0] for c in UNNAMED])
def test_unknown_keys_and_oversized_schemas_are_refused_unnamed(schema: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        check_schema(schema, "response_format.json_schema.schema")
    assert caught.value.code == "unsupported_schema"
    assert SECRET not in caught.value.message and "maxLenght" not in caught.value.message


def test_the_limits_admit_a_schema_at_them() -> None:
    check_schema({"enum": [f"v{i}" for i in range(1000)]}, "p")
    names = [f"p{i}" for i in range(5000)]
    check_schema({"type": "object", "properties": dict.fromkeys(names, {}), "required": names}, "p")


def test_grammar_refuses_what_check_refuses() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        json_schema_grammar(json.dumps({"type": "string", "pattern": "^a$"}))
    assert "'pattern'" in caught.value.message


def test_prop_order_puts_names_first(recognizer: Recognizer) -> None:
    schema = {
        "type": "object",
        "properties": {"arguments": {"type": "object"}, "name": {"const": "f"}},
        "required": ["arguments", "name"],
    }
    grammar = json_schema_grammar(json.dumps(schema), prop_order=("name", "arguments"))
    assert recognizer.accepts(grammar, '{"name": "f", "arguments": {}}')
    assert not recognizer.accepts(grammar, '{"arguments": {}, "name": "f"}')
