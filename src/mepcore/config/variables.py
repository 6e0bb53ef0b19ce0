"""Checking the variables a user sends for a template, and the config key they yield.

``validate_variables`` bounds the input first (size, nesting, string length, number of
keys and items — iteratively and cheaply, so hostile input is refused before anything
expensive runs), refuses reserved names and keys that are not plain identifiers, and
then applies the administrator's JSON Schema. Every problem found is reported with its
JSON path. It deliberately does not render anything and does not read files: the
schema comes in as data.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from mepcore.config.limits import VariableLimits
from mepcore.errors import ConfigError, TemplateConfigError, Violation

# jsonschema is imported where a schema is used, not with this module: rendering (in
# every user endpoint) needs only the structural checks here.
if TYPE_CHECKING:
    import jsonschema
    import jsonschema.exceptions
    import jsonschema.protocols

# Names the renderer itself defines; a user variable may not shadow them.
RESERVED_NAMES: frozenset[str] = frozenset(
    {"_GC", "parent_config", "user_runtime", "mapped_identity"}
)

# A key renders verbatim when a template iterates over a mapping (``{{ k }}: {{ v }}``),
# so it must be a plain scalar that YAML reads back as the same string.
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Plain scalars YAML 1.1 (PyYAML) reads as booleans or null rather than strings.
_YAML_WORDS: frozenset[str] = frozenset({"yes", "no", "true", "false", "on", "off", "null"})

# Integers beyond 64 bits have no use in a configuration and make str() expensive.
_INT_BOUND = 2**63
_MAX_MESSAGE = 300
MAX_VIOLATIONS = 100


def json_path(base: str, key: str | int) -> str:
    """``$`` + ``.name`` for identifier keys, ``[3]`` for indexes, ``["odd key"]`` else."""
    if isinstance(key, int):
        return f"{base}[{key}]"
    if _IDENTIFIER.fullmatch(key):
        return f"{base}.{key}"
    shown = key if len(key) <= 64 else key[:64] + "…"
    return f"{base}[{json.dumps(shown)}]"


def is_plain_key(key: str) -> bool:
    """True if ``key`` may be a mapping key in user data (renders as itself in YAML)."""
    return bool(_IDENTIFIER.fullmatch(key)) and key.lower() not in _YAML_WORDS


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + "…"


class _TooLarge(Exception):
    def __init__(self, violation: Violation) -> None:
        super().__init__(violation.message)
        self.violation = violation


def structural_violations(
    value: Any,
    limits: VariableLimits,
    *,
    reserved: frozenset[str] = RESERVED_NAMES,
    max_violations: int = MAX_VIOLATIONS,
) -> list[Violation]:
    """Bounds, types, keys and reserved names of a JSON-like value (top level an object).

    Raises ``ConfigError(config.variables_too_large)`` at the first bound exceeded —
    walking on would only cost time — reporting that bound and at most
    ``max_violations - 1`` problems found before it. Other problems are returned, all of
    them (the caller bounds what it reports).
    """
    found: list[Violation] = []
    try:
        _walk(value, limits, reserved, found)
    except _TooLarge as exc:
        raise ConfigError(
            "config.variables_too_large",
            exc.violation.message,
            violations=[*found[: max_violations - 1], exc.violation],
        ) from None
    return found


def _walk(
    root: Any, limits: VariableLimits, reserved: frozenset[str], found: list[Violation]
) -> None:
    if not isinstance(root, Mapping):
        found.append(Violation("$", "the variables must be a JSON object", "invalid_type"))
        return
    _Walk(limits, reserved, found).run(root)


class _Walk:
    """One walk over user data: the running totals, the violations found so far and the
    values still to visit. Each ``_visit_*`` adds a value's share to the totals and
    raises ``_TooLarge`` at the first bound it exceeds."""

    def __init__(
        self, limits: VariableLimits, reserved: frozenset[str], found: list[Violation]
    ) -> None:
        self.limits = limits
        self.reserved = reserved
        self.found = found
        self.size = 0
        self.keys = 0
        self.items = 0
        self.stack: list[tuple[Any, str, int]] = []

    def run(self, root: Mapping[Any, Any]) -> None:
        # Iterative on purpose: hostile nesting must not reach Python's recursion limit.
        self.stack.append((root, "$", 1))
        while self.stack:
            value, path, depth = self.stack.pop()
            self._visit(value, path, depth)
            if self.size > self.limits.max_total_bytes:
                raise _TooLarge(
                    Violation(
                        path,
                        f"variables larger than {self.limits.max_total_bytes} bytes",
                        "too_large",
                    )
                )

    def _visit(self, value: Any, path: str, depth: int) -> None:
        if isinstance(value, str):
            self._visit_string(value, path)
        elif isinstance(value, bool) or value is None:
            self.size += 5
        elif isinstance(value, int):
            self._visit_integer(value, path)
        elif isinstance(value, float):
            self._visit_float(value, path)
        elif isinstance(value, Mapping):
            self._visit_mapping(value, path, depth)
        elif isinstance(value, list | tuple):
            self._visit_sequence(value, path, depth)
        else:
            self.found.append(
                Violation(path, f"{type(value).__name__} is not a JSON value", "invalid_type")
            )

    def _visit_string(self, value: str, path: str) -> None:
        if len(value) > self.limits.max_string_length:
            raise _TooLarge(
                Violation(
                    path,
                    f"string longer than {self.limits.max_string_length} characters",
                    "too_large",
                )
            )
        try:
            self.size += len(value.encode("utf-8")) + 2
        except UnicodeEncodeError:
            self.found.append(Violation(path, "string is not valid Unicode", "invalid_type"))

    def _visit_integer(self, value: int, path: str) -> None:
        if not -_INT_BOUND <= value < _INT_BOUND:
            self.found.append(Violation(path, "integer out of the 64-bit range", "invalid_type"))
            return
        self.size += len(str(value))

    def _visit_float(self, value: float, path: str) -> None:
        if not math.isfinite(value):
            self.found.append(Violation(path, "number is not finite", "invalid_type"))
            return
        self.size += len(repr(value))

    def _check_depth(self, path: str, depth: int) -> None:
        if depth > self.limits.max_depth:
            raise _TooLarge(
                Violation(path, f"nested deeper than {self.limits.max_depth}", "too_large")
            )

    def _visit_mapping(self, value: Mapping[Any, Any], path: str, depth: int) -> None:
        self._check_depth(path, depth)
        self.keys += len(value)
        if self.keys > self.limits.max_keys:
            raise _TooLarge(Violation(path, f"more than {self.limits.max_keys} keys", "too_large"))
        self.size += 2 + len(value)
        children: list[tuple[Any, str, int]] = []
        for key, sub in value.items():
            child = self._visit_key(key, path, depth)
            if child is not None:
                children.append((sub, child, depth + 1))
        self.stack.extend(reversed(children))

    def _visit_key(self, key: Any, path: str, depth: int) -> str | None:
        """The child's path, or None when the key is not a string (its value is skipped)."""
        if not isinstance(key, str):
            self.found.append(Violation(path, f"key {key!r} is not a string", "invalid_type"))
            return None
        if len(key) > self.limits.max_string_length:
            raise _TooLarge(Violation(path, "key too long", "too_large"))
        self.size += len(key.encode("utf-8", "replace")) + 3
        child = json_path(path, key)
        if depth == 1 and key in self.reserved:
            self.found.append(Violation(child, f"{key!r} is a reserved name", "reserved_name"))
        elif not is_plain_key(key):
            self.found.append(
                Violation(
                    child,
                    "keys must be plain identifiers ([A-Za-z_][A-Za-z0-9_]*, "
                    "not a YAML boolean or null word)",
                    "invalid_key",
                )
            )
        return child

    def _visit_sequence(self, value: list[Any] | tuple[Any, ...], path: str, depth: int) -> None:
        self._check_depth(path, depth)
        self.items += len(value)
        if self.items > self.limits.max_items:
            raise _TooLarge(
                Violation(path, f"more than {self.limits.max_items} array items", "too_large")
            )
        self.size += 2 + len(value)
        self.stack.extend(
            (sub, json_path(path, i), depth + 1) for i, sub in reversed(list(enumerate(value)))
        )


def schema_validator(
    schema: Mapping[str, Any], *, source: str = "schema"
) -> jsonschema.protocols.Validator:
    """A validator for ``schema`` (JSON Schema 2020-12 unless ``$schema`` says otherwise).

    Raises ``TemplateConfigError(config.schema_invalid)`` if the schema itself is wrong.
    """
    import jsonschema
    import jsonschema.exceptions
    import jsonschema.validators

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(dict(schema))
    except jsonschema.exceptions.SchemaError as exc:
        where = "$" + "".join(f"[{json.dumps(p)}]" for p in exc.absolute_path)
        raise TemplateConfigError(
            "config.schema_invalid",
            f"{source}: {where}: {_clip(exc.message)}",
            violations=[Violation(where, _clip(exc.message), str(exc.validator))],
        ) from exc
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def schema_violations(
    validator: jsonschema.protocols.Validator, instance: Any, *, limit: int = MAX_VIOLATIONS
) -> list[Violation]:
    """Every schema error (up to ``limit``), ordered by path; unknown keys one by one."""
    out: list[Violation] = []
    for error in _bounded(validator.iter_errors(instance), limit):
        path = "$"
        for part in error.absolute_path:
            path = json_path(path, part)
        if error.validator == "additionalProperties" and isinstance(error.instance, Mapping):
            for key in _unexpected_keys(error.instance, error.schema):
                out.append(Violation(json_path(path, key), f"unknown key {key!r}", "unknown_key"))
            continue
        out.append(Violation(path, _clip(error.message), str(error.validator)))
    out.sort(key=lambda v: v.path)
    return out[:limit]


def _bounded(
    errors: Iterator[jsonschema.exceptions.ValidationError], limit: int
) -> Iterator[jsonschema.exceptions.ValidationError]:
    for count, error in enumerate(errors):
        if count >= limit:
            return
        yield error


def _unexpected_keys(instance: Mapping[str, Any], schema: Any) -> list[str]:
    if not isinstance(schema, Mapping):
        return []
    known = schema.get("properties") or {}
    patterns = [re.compile(p) for p in (schema.get("patternProperties") or {})]
    return sorted(
        str(k) for k in instance if k not in known and not any(p.search(str(k)) for p in patterns)
    )


def validate_variables(
    variables: Any,
    schema: Mapping[str, Any] | None,
    limits: VariableLimits = VariableLimits(),  # noqa: B008 - frozen, so sharing is safe
) -> dict[str, Any]:
    """Check a user's variables; return them as a plain dict.

    ``None`` stands for no variables (``{}``). Raises ``ConfigError`` with reason
    ``config.variables_too_large`` (a bound exceeded), ``config.reserved_variable``
    (a reserved name used) or ``config.invalid_variables`` (anything else), carrying
    every violation found in ``.violations``.
    """
    if variables is None:
        variables = {}
    found = structural_violations(variables, limits)
    # Values that are not JSON at all would only confuse the schema validator.
    if schema is not None and not any(v.code == "invalid_type" for v in found):
        validator = schema_validator(schema)
        found.extend(
            schema_violations(
                validator, _plain(variables) if isinstance(variables, Mapping) else variables
            )
        )
    if found:
        reason = (
            "config.reserved_variable"
            if any(v.code == "reserved_name" for v in found)
            else "config.invalid_variables"
        )
        first = found[0]
        raise ConfigError(
            reason,
            f"{len(found)} problem(s) in the variables, first {first.path}: {first.message}",
            violations=found[:MAX_VIOLATIONS],
        )
    result = _plain(variables)
    assert isinstance(result, dict)
    return result


def _plain(value: Any) -> Any:
    """A deep copy made of dict/list/scalars only (bounded input: walked iteratively)."""
    if not isinstance(value, Mapping | list | tuple):
        return value
    root: Any = {} if isinstance(value, Mapping) else []
    stack: list[tuple[Any, Any]] = [(value, root)]
    while stack:
        source, target = stack.pop()
        pairs: Sequence[tuple[Any, Any]] = (
            list(source.items()) if isinstance(source, Mapping) else list(enumerate(source))
        )
        for key, sub in pairs:
            if isinstance(sub, Mapping):
                copy: Any = {}
                stack.append((sub, copy))
            elif isinstance(sub, list | tuple):
                copy = []
                stack.append((sub, copy))
            else:
                copy = sub
            if isinstance(target, dict):
                target[key] = copy
            else:
                target.append(copy)
    return root


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, ASCII only: equal data gives equal text."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def config_key(account_name: str, template_digest: str, variables: Mapping[str, Any]) -> str:
    """The identity of a user endpoint: sha256 (hex) over canonical JSON of
    ``[account_name, template_digest, variables]``. Equal requests share one user
    endpoint; different variables get their own."""
    text = canonical_json([account_name, template_digest, _plain(variables)])
    return hashlib.sha256(text.encode("ascii")).hexdigest()
