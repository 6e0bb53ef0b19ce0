"""JSON Schemas of the mapping documents and of an external program's answer.

``document_violations`` checks one mapping document and returns every problem as a
``Violation`` located by a JSON path (``$[1].mappings[0].match``). Unknown keys are
ignored, as Globus Connect Server and Globus Compute ignore them (their own example file
carries a ``comment``); ``unknown_key_warnings`` lists them for ``mepd check``, because a
misspelt ``ignorecase`` silently ignored changes who maps to whom. The keys mep knows
must have the right JSON type: ``"ignore_case": "false"`` is an error, not true.
This module deliberately knows nothing about regexes or templates (``mapper`` checks
those after the schema passed).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

import jsonschema

from mepcore.errors import Violation
from mepcore.identity.dialect import SYNTAX_KEY, SYNTAXES

EXPRESSION_TYPE = "expression_identity_mapping#1.0.0"
EXTERNAL_TYPE = "external_identity_mapping#1.0.0"
INPUT_TYPE = "identity_mapping_input#1.0.0"
OUTPUT_TYPE = "identity_mapping_output#1.0.0"

MAX_RULES = 10_000
MAX_PATTERN_LENGTH = 4096
MAX_TEMPLATE_LENGTH = 1024

# Keys a document may carry for people, not for mep: no warning.
COMMENT_KEYS = frozenset({"comment"})

_EXPRESSION_SCHEMA: Mapping[str, Any] = {
    "type": "object",
    "required": ["DATA_TYPE", "mappings"],
    "properties": {
        "DATA_TYPE": {"const": EXPRESSION_TYPE},
        # mep-specific: the match syntax of every rule (the reference ignores the key).
        SYNTAX_KEY: {"enum": list(SYNTAXES)},
        "mappings": {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_RULES,
            "items": {
                "type": "object",
                "required": ["source", "match", "output"],
                "properties": {
                    "source": {"type": "string", "minLength": 1, "maxLength": MAX_TEMPLATE_LENGTH},
                    "match": {"type": "string", "minLength": 1, "maxLength": MAX_PATTERN_LENGTH},
                    "output": {"type": "string", "minLength": 1, "maxLength": MAX_TEMPLATE_LENGTH},
                    # JSON booleans only: the string "false" is an error, not truthy.
                    "ignore_case": {"type": "boolean"},
                    "literal": {"type": "boolean"},
                },
            },
        },
    },
}

_EXTERNAL_SCHEMA: Mapping[str, Any] = {
    "type": "object",
    "required": ["DATA_TYPE", "command"],
    "properties": {
        "DATA_TYPE": {"const": EXTERNAL_TYPE},
        "command": {
            "type": "array",
            "minItems": 1,
            "maxItems": 256,
            "items": {"type": "string", "minLength": 1, "maxLength": 4096},
        },
    },
}

OUTPUT_SCHEMA: Mapping[str, Any] = {
    "type": "object",
    "required": ["DATA_TYPE", "result"],
    "properties": {
        "DATA_TYPE": {"const": OUTPUT_TYPE},
        "result": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "output"],
                "properties": {
                    "id": {"type": "string", "minLength": 1},
                    "output": {"type": "string"},
                },
            },
        },
    },
}

# Built once, at import (cheap: no I/O); read-only afterwards.
_VALIDATORS: Mapping[str, jsonschema.protocols.Validator] = MappingProxyType(
    {
        EXPRESSION_TYPE: jsonschema.Draft202012Validator(_EXPRESSION_SCHEMA),
        EXTERNAL_TYPE: jsonschema.Draft202012Validator(_EXTERNAL_SCHEMA),
        OUTPUT_TYPE: jsonschema.Draft202012Validator(OUTPUT_SCHEMA),
    }
)
DOCUMENT_TYPES = (EXPRESSION_TYPE, EXTERNAL_TYPE)


def json_path(base: str, parts: Iterable[str | int]) -> str:
    """``$[1].mappings[0].match`` from a base and path parts."""
    out = base
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier():
            out += f".{part}"
        else:
            out += f"[{part!r}]"
    return out


def _violations(validator_key: str, instance: Any, base: str) -> list[Violation]:
    found: list[Violation] = []
    for error in _VALIDATORS[validator_key].iter_errors(instance):
        parts: list[str | int] = list(error.absolute_path)
        message = error.message
        if error.validator == "required" and isinstance(error.instance, Mapping):
            required: list[str] = list(error.validator_value)  # type: ignore[arg-type]
            missing = [k for k in required if k not in error.instance]
            for key in missing:
                found.append(
                    Violation(json_path(base, [*parts, key]), "is required", code="required")
                )
            continue
        if error.validator == "type":
            message = f"must be of type {error.validator_value}, not {_json_type(error.instance)}"
        found.append(Violation(json_path(base, parts), message, code=str(error.validator)))
    found.sort(key=lambda v: v.path)
    return found


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"string {value[:40]!r}"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, list):
        return "array"
    return "object"


def document_violations(document: Any, base: str) -> list[Violation]:
    """Every schema problem of one mapping document (empty when it is valid)."""
    if not isinstance(document, Mapping):
        return [Violation(base, "a mapping document must be a JSON object", code="type")]
    data_type = document.get("DATA_TYPE")
    if "DATA_TYPE" not in document:
        return [Violation(f"{base}.DATA_TYPE", "is required", code="required")]
    if data_type not in DOCUMENT_TYPES:
        return [
            Violation(
                f"{base}.DATA_TYPE",
                f"unknown DATA_TYPE {data_type!r} (known: {', '.join(DOCUMENT_TYPES)})",
                code="unknown_type",
            )
        ]
    return _violations(str(data_type), document, base)


def unknown_key_warnings(document: Any, base: str) -> list[Violation]:
    """The keys of a (valid) mapping document mep ignores, outside ``COMMENT_KEYS``: in
    the document and in each of its rules."""
    if not isinstance(document, Mapping) or document.get("DATA_TYPE") not in DOCUMENT_TYPES:
        return []
    schema = _EXPRESSION_SCHEMA if document["DATA_TYPE"] == EXPRESSION_TYPE else _EXTERNAL_SCHEMA
    found = _unknown(document, schema["properties"], base)
    if document["DATA_TYPE"] == EXPRESSION_TYPE and isinstance(document.get("mappings"), list):
        rule_keys = schema["properties"]["mappings"]["items"]["properties"]
        for index, rule in enumerate(document["mappings"]):
            found += _unknown(rule, rule_keys, json_path(base, ["mappings", index]))
    return found


def _unknown(item: Any, known: Mapping[str, Any], base: str) -> list[Violation]:
    if not isinstance(item, Mapping):
        return []
    return [
        Violation(
            json_path(base, [key]),
            f"unknown key, ignored (known: {', '.join(sorted(known))})",
            code="unknown_key",
        )
        for key in sorted(str(k) for k in item)
        if key not in known and key not in COMMENT_KEYS
    ]


def output_violations(answer: Any) -> list[Violation]:
    """Every schema problem of an external program's answer."""
    return _violations(OUTPUT_TYPE, answer, "$")
