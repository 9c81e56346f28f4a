"""JSON schemas as llama.cpp grammars, and the schema features medserve can enforce.

Interface fixed for issue 18 (structured answers); the implementation is the llama.cpp
engine's work: ``check_schema`` must refuse (InvalidRequestError naming the keyword, never
a property name or value: they are client text that can name patient fields) every schema
keyword that llama.cpp's JSON-schema-to-grammar conversion (llama-cpp-python's
``llama_grammar.json_schema_to_gbnf``) would not enforce, so that no constraint is
silently dropped; ``json_schema_grammar`` compiles a checked schema.
"""

from __future__ import annotations

from typing import Any


def check_schema(schema: Any, param: str) -> None:
    """Raise :class:`medserve.errors.InvalidRequestError` (400, ``param``) when ``schema``
    (a parsed JSON schema) uses a keyword or form the grammar cannot enforce. Placeholder:
    accepts every schema until the engine work lands."""


def json_schema_grammar(schema: str | None) -> str:
    """The GBNF grammar (llama.cpp's format) for a checked schema's canonical JSON text,
    or for any JSON object when ``schema`` is None. Placeholder until the engine work."""
    raise NotImplementedError
