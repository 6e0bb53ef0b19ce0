"""JSON Schemas of the mapping documents and of an external program's answer.

``document_violations`` checks one mapping document and returns every problem as a
``Violation`` located by a JSON path (``$[1].mappings[0].match``). Unknown keys are
refused: a misspelt ``ignorecase`` silently ignored would change who maps to whom.
This module deliberately knows nothing about regexes or templates (``loader`` checks
those after the schema passed).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

import jsonschema

from mepcore.errors import Violation

EXPRESSION_TYPE = "expression_identity_mapping#1.0.0"
EXTERNAL_TYPE = "external_identity_mapping#1.0.0"
INPUT_TYPE = "identity_mapping_input#1.0.0"
OUTPUT_TYPE = "identity_mapping_output#1.0.0"

MAX_RULES = 10_000
MAX_PATTERN_LENGTH = 4096
MAX_TEMPLATE_LENGTH = 1024

_EXPRESSION_SCHEMA: Mapping[str, Any] = {
    "type": "object",
    "required": ["DATA_TYPE", "mappings"],
    "additionalProperties": False,
    "properties": {
        "DATA_TYPE": {"const": EXPRESSION_TYPE},
        "mappings": {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_RULES,
            "items": {
                "type": "object",
                "required": ["source", "match", "output"],
                "additionalProperties": False,
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
    "additionalProperties": False,
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
        if error.validator == "additionalProperties" and isinstance(error.instance, Mapping):
            schema = error.schema if isinstance(error.schema, Mapping) else {}
            allowed = set(schema.get("properties", {}))
            for key in sorted(k for k in error.instance if k not in allowed):
                found.append(
                    Violation(
                        json_path(base, [*parts, key]),
                        f"unknown key (allowed: {', '.join(sorted(allowed))})",
                        code="unknown_key",
                    )
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


def output_violations(answer: Any) -> list[Violation]:
    """Every schema problem of an external program's answer."""
    return _violations(OUTPUT_TYPE, answer, "$")
