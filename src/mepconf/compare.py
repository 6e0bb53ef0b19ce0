"""Comparing what an adapter observed with what a case expects.

Two modes (``expect.match``):

- ``subset`` (the default): an expected object matches an actual object that has at
  least the expected keys, each matching recursively; an expected list matches an
  actual list of the same length whose items match pairwise (recursively, in subset
  mode); scalars must be equal *and* of the same JSON type (``true`` is not ``1``,
  ``1`` equals ``1.0``).
- ``exact``: deep equality with the same type rule; objects must have the same keys.

In both modes an expected value may be a matcher object with one key:
``{"$type": "string"|"number"|"integer"|"boolean"|"null"|"object"|"array"}`` matches
any value of that JSON type; ``{"$absent": true}`` (only as an object member) matches
when the key is missing; ``{"$contains": [...]}`` matches a list holding items that
match each given item (in any order); ``{"$any": true}`` matches anything present.

The result is a list of human-readable mismatches located by JSON path; empty means
a match.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_TYPES = ("string", "number", "integer", "boolean", "null", "object", "array")


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, list | tuple):
        return "array"
    return type(value).__name__


def _is_matcher(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and len(value) == 1
        and next(iter(value)) in ("$type", "$absent", "$contains", "$any")
    )


def compare(expected: Any, actual: Any, *, exact: bool = False, path: str = "$") -> list[str]:
    """Every mismatch between ``expected`` and ``actual`` (empty when they match)."""
    if _is_matcher(expected):
        return _match(expected, actual, exact=exact, path=path)
    if isinstance(expected, Mapping):
        if not isinstance(actual, Mapping):
            return [f"{path}: expected an object, got {_show(actual)}"]
        out: list[str] = []
        for key, want in expected.items():
            sub = f"{path}.{key}"
            if _is_matcher(want) and "$absent" in want:
                if key in actual:
                    out.append(f"{sub}: expected no such key, got {_show(actual[key])}")
                continue
            if key not in actual:
                out.append(f"{sub}: missing (expected {_show(want)})")
                continue
            out.extend(compare(want, actual[key], exact=exact, path=sub))
        if exact:
            extra = sorted(str(k) for k in actual if k not in expected)
            if extra:
                out.append(f"{path}: unexpected keys {extra}")
        return out
    if isinstance(expected, list):
        if not isinstance(actual, list | tuple):
            return [f"{path}: expected an array, got {_show(actual)}"]
        if len(expected) != len(actual):
            return [f"{path}: expected {len(expected)} items, got {len(actual)}: {_show(actual)}"]
        out = []
        for i, (want, got) in enumerate(zip(expected, actual, strict=True)):
            out.extend(compare(want, got, exact=exact, path=f"{path}[{i}]"))
        return out
    if _scalar_equal(expected, actual):
        return []
    return [f"{path}: expected {_show(expected)}, got {_show(actual)}"]


def _scalar_equal(expected: Any, actual: Any) -> bool:
    et, at = json_type(expected), json_type(actual)
    numeric = ("integer", "number")
    if et in numeric and at in numeric:
        return bool(expected == actual)
    return et == at and bool(expected == actual)


def _match(matcher: Mapping[str, Any], actual: Any, *, exact: bool, path: str) -> list[str]:
    key, arg = next(iter(matcher.items()))
    if key == "$any":
        return []
    if key == "$absent":
        return [f"{path}: $absent is only meaningful as an object member"]
    if key == "$type":
        if arg not in _TYPES:
            return [f"{path}: unknown $type {arg!r}"]
        got = json_type(actual)
        ok = got == arg or (arg == "number" and got == "integer")
        return [] if ok else [f"{path}: expected a value of type {arg}, got {_show(actual)}"]
    # $contains
    if not isinstance(actual, list | tuple):
        return [f"{path}: expected an array, got {_show(actual)}"]
    out = []
    for want in arg:
        if not any(not compare(want, got, exact=exact, path=path) for got in actual):
            out.append(f"{path}: no item matches {_show(want)} in {_show(actual)}")
    return out


def _show(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
