"""A quick, conservative check that a document is valid against a JSON Schema.

A user endpoint validates its rendered configuration once, at start, against the
project's own schema (``endpoint_config_schema``). Importing jsonschema costs a start
about a quarter of its time (jsonschema, referencing, the bundled meta-schemas), so a
configuration is first given to ``certainly_valid``: it understands the few keywords
that schema uses and answers ``True`` only when the document is valid for certain.
Anything else — a violation, a keyword or value it does not decide (a float where an
integer is asked for, a non-string ``enum`` member, an unresolved ``$ref``…) — answers
``False``/``None``, and the caller then runs jsonschema, which stays the one authority
and makes every report: the violations and reason codes of a refusal are jsonschema's.

Soundness is the whole contract ("``True`` implies jsonschema finds no error"); it is
tested against jsonschema itself on generated documents (tests/test_config_quickcheck.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

# Keywords that never make a document invalid.
_ANNOTATIONS = frozenset({"$schema", "$defs", "$comment", "title", "description"})
_JSON_SCALARS = (str, int, float, bool, type(None))

# A three-valued answer: True (valid for certain), False (invalid for certain), None
# (not decided here).
Answer = bool | None


def certainly_valid(schema: Mapping[str, Any], instance: Any) -> bool:
    """True only if ``instance`` is valid against ``schema`` (JSON Schema 2020-12) for
    certain; False means "ask jsonschema", not necessarily "invalid"."""
    try:
        return _check(schema, instance, schema) is True
    except Exception:  # anything unforeseen: let jsonschema decide
        return False


def _all(answers: Any) -> Answer:
    """The conjunction of three-valued answers: False wins, then None."""
    result: Answer = True
    for answer in answers:
        if answer is False:
            return False
        if answer is None:
            result = None
    return result


def _check(schema: Any, instance: Any, root: Mapping[str, Any]) -> Answer:
    if schema is True or schema == {}:
        return True
    if not isinstance(schema, Mapping) or not _is_json(instance):
        return None
    answers = []
    for keyword, value in schema.items():
        if keyword in _ANNOTATIONS or keyword in ("then", "else"):
            continue
        rule = _RULES.get(keyword)
        if rule is None:
            return None
        answers.append(rule(value, instance, schema, root))
    return _all(answers)


def _is_json(instance: Any) -> bool:
    if isinstance(instance, float):
        return math.isfinite(instance)
    return isinstance(instance, (*_JSON_SCALARS, dict, list))


def _is_number(instance: Any) -> bool:
    return isinstance(instance, (int, float)) and not isinstance(instance, bool)


def _type(value: Any, instance: Any, _schema: Any, _root: Any) -> Answer:
    names = [value] if isinstance(value, str) else value
    answers = [_is_type(name, instance) for name in names]
    if True in answers:
        return True
    return None if None in answers else False


def _is_type(name: str, instance: Any) -> Answer:
    if name == "integer" and isinstance(instance, float):
        return None  # 1.0 is an integer to JSON Schema: left to jsonschema
    checks: dict[str, Callable[[Any], bool]] = {
        "string": lambda x: isinstance(x, str),
        "integer": lambda x: isinstance(x, int) and not isinstance(x, bool),
        "number": _is_number,
        "boolean": lambda x: isinstance(x, bool),
        "null": lambda x: x is None,
        "object": lambda x: isinstance(x, dict),
        "array": lambda x: isinstance(x, list),
    }
    check = checks.get(name)
    return None if check is None else check(instance)


def _bound(test: Callable[[Any, Any], bool]) -> Callable[[Any, Any, Any, Any], Answer]:
    def rule(value: Any, instance: Any, _schema: Any, _root: Any) -> Answer:
        if not _is_number(instance):
            return True
        if not _is_number(value):
            return None
        return test(instance, value)

    return rule


def _length(
    test: Callable[[int, Any], bool], kind: type[str] | type[list[Any]]
) -> Callable[[Any, Any, Any, Any], Answer]:
    def rule(value: Any, instance: Any, _schema: Any, _root: Any) -> Answer:
        if not isinstance(instance, kind):
            return True
        return test(len(instance), value) if isinstance(value, int) else None

    return rule


def _pattern(value: Any, instance: Any, _schema: Any, _root: Any) -> Answer:
    if not isinstance(instance, str):
        return True
    return re.search(value, instance) is not None if isinstance(value, str) else None


def _strings(values: Any, instance: Any) -> Answer:
    # Only strings compared with strings are decided (JSON Schema equality of other
    # values — 1 vs 1.0 vs true, nested containers — is left to jsonschema).
    if not isinstance(instance, str) or not all(isinstance(v, str) for v in values):
        return None
    return instance in values


def _enum(value: Any, instance: Any, _schema: Any, _root: Any) -> Answer:
    return _strings(value, instance) if isinstance(value, list) else None


def _const(value: Any, instance: Any, _schema: Any, _root: Any) -> Answer:
    return _strings([value], instance)


def _required(value: Any, instance: Any, _schema: Any, _root: Any) -> Answer:
    if not isinstance(instance, dict):
        return True
    return all(key in instance for key in value)


def _properties(value: Any, instance: Any, _schema: Any, root: Any) -> Answer:
    if not isinstance(instance, dict):
        return True
    return _all(_check(sub, instance[key], root) for key, sub in value.items() if key in instance)


def _additional(value: Any, instance: Any, schema: Any, root: Any) -> Answer:
    if not isinstance(instance, dict):
        return True
    if "patternProperties" in schema:
        return None
    known = schema.get("properties") or {}
    extra = [key for key in instance if key not in known]
    if value is False:
        return not extra
    return _all(_check(value, instance[key], root) for key in extra)


def _items(value: Any, instance: Any, schema: Any, root: Any) -> Answer:
    if not isinstance(instance, list):
        return True
    if "prefixItems" in schema:
        return None
    return _all(_check(value, item, root) for item in instance)


def _unique(value: Any, instance: Any, _schema: Any, _root: Any) -> Answer:
    if value is not True or not isinstance(instance, list):
        return True
    if not all(isinstance(item, str) for item in instance):
        return None
    return len(set(instance)) == len(instance)


def _all_of(value: Any, instance: Any, _schema: Any, root: Any) -> Answer:
    return _all(_check(sub, instance, root) for sub in value)


def _one_of(value: Any, instance: Any, _schema: Any, root: Any) -> Answer:
    answers = [_check(sub, instance, root) for sub in value]
    if None in answers:
        return None
    return answers.count(True) == 1


def _if(value: Any, instance: Any, schema: Any, root: Any) -> Answer:
    condition = _check(value, instance, root)
    if condition is None:
        return None
    branch = schema.get("then" if condition else "else", True)
    return _check(branch, instance, root)


def _ref(value: Any, instance: Any, _schema: Any, root: Any) -> Answer:
    # Only a reference into the root's own $defs is followed.
    if not isinstance(value, str) or not value.startswith("#/$defs/"):
        return None
    name = value.removeprefix("#/$defs/")
    if "/" in name or "~" in name or "%" in name:
        return None
    target = (root.get("$defs") or {}).get(name)
    return None if target is None else _check(target, instance, root)


_RULES: dict[str, Callable[[Any, Any, Any, Any], Answer]] = {
    "type": _type,
    "minimum": _bound(lambda x, bound: x >= bound),
    "maximum": _bound(lambda x, bound: x <= bound),
    "exclusiveMinimum": _bound(lambda x, bound: x > bound),
    "exclusiveMaximum": _bound(lambda x, bound: x < bound),
    "minLength": _length(lambda n, bound: n >= bound, str),
    "maxLength": _length(lambda n, bound: n <= bound, str),
    "minItems": _length(lambda n, bound: n >= bound, list),
    "maxItems": _length(lambda n, bound: n <= bound, list),
    "pattern": _pattern,
    "enum": _enum,
    "const": _const,
    "required": _required,
    "properties": _properties,
    "additionalProperties": _additional,
    "items": _items,
    "uniqueItems": _unique,
    "allOf": _all_of,
    "oneOf": _one_of,
    "if": _if,
    "$ref": _ref,
}
