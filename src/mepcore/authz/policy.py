"""Parsing and validating policy files (Casbin CSV) into ``PolicyLine`` values.

Three kinds of lines, one per row, fields separated by commas:

- ``p, <subject>, <endpoint>, <object>, <action>, <cond>, <allow|deny>`` — a rule;
- ``g, <principal or role>, <role>, <endpoint>`` — a role held in one endpoint;
- ``g2, <object or set>, <set>`` — object groups such as function sets.

Blank lines and lines starting with ``#`` are ignored. Everything else is checked here,
at load time, and refused with the file and line number: the field count, characters
Casbin's tokenizer treats specially (quotes, brackets, parentheses) or that are easy to
misread (whitespace, control characters, ``#`` after data), patterns (a ``*`` must be a
whole segment), actions (the fixed set or ``*``), effects, and conditions (the fixed
predicate registry). Role and set names are literal: no wildcards in ``g``/``g2`` lines.

Deliberately not here: quoting, escaping or continuation lines.
"""

from __future__ import annotations

import re
from typing import Any

import attrs

from mepcore.authz.patterns import validate_pattern
from mepcore.authz.predicates import Predicate, parse_conditions
from mepcore.errors import AuthzConfigError

ACTIONS: frozenset[str] = frozenset(
    {
        "map_identity",
        "start_endpoint",
        "submit_task",
        "read_result",
        "stop_endpoint",
        "read_status",
        "admin",
    }
)
ANY_ACTION = "*"
EFFECTS = frozenset({"allow", "deny"})
FIELD_COUNTS = {"p": 6, "g": 3, "g2": 2}
MAX_FIELD_LENGTH = 1024

# Printable, no whitespace, nothing Casbin's tokenizer nests on, no quotes or comments.
_FIELD_RE = re.compile(r"[^\s\x00-\x1f\x7f,\"'\[\]()#\\]+")


@attrs.frozen
class PolicyLine:
    """One line of a policy file, with where it came from."""

    ptype: str
    fields: tuple[str, ...]
    source: str
    lineno: int

    def __str__(self) -> str:
        return ", ".join((self.ptype, *self.fields))

    @property
    def location(self) -> str:
        return f"{self.source}:{self.lineno}"

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "line": self.lineno, "text": str(self)}


@attrs.frozen
class Rule:
    """A parsed ``p`` line: its patterns, action, conditions and effect."""

    line: PolicyLine
    order: int
    subject: str
    endpoint: str
    obj: str
    action: str
    conditions: tuple[Predicate, ...]
    effect: str


def _refuse(source: str, lineno: int, message: str) -> AuthzConfigError:
    return AuthzConfigError(
        "authz.policy_invalid",
        f"{source}:{lineno}: {message}",
        context={"file": source, "line": lineno},
    )


def parse_policy_line(raw: str, source: str, lineno: int) -> PolicyLine | None:
    """Parse one raw line; None for blank and comment lines."""
    text = raw.strip()
    if not text or text.startswith("#"):
        return None
    parts = [part.strip() for part in text.split(",")]
    ptype, fields = parts[0], tuple(parts[1:])
    if ptype not in FIELD_COUNTS:
        raise _refuse(source, lineno, f"unknown line type {ptype!r} (expected p, g or g2)")
    if len(fields) != FIELD_COUNTS[ptype]:
        raise _refuse(
            source,
            lineno,
            f"a {ptype!r} line has {FIELD_COUNTS[ptype]} fields after the type, not {len(fields)}",
        )
    for index, value in enumerate(fields):
        is_cond = ptype == "p" and index == 4
        if is_cond and value == "":
            continue
        if len(value) > MAX_FIELD_LENGTH or not _FIELD_RE.fullmatch(value):
            raise _refuse(
                source,
                lineno,
                f"field {index + 1} ({value!r}) is empty or has forbidden characters",
            )
    if ptype in ("g", "g2"):
        for value in fields:
            if "*" in value:
                raise _refuse(source, lineno, f"role and set names are literal; {value!r} has '*'")
    return PolicyLine(ptype, fields, source, lineno)


def rule_from_line(line: PolicyLine, order: int) -> Rule:
    """Validate a ``p`` line's patterns, action, conditions and effect."""
    subject, endpoint, obj, action, cond, effect = line.fields
    try:
        for pattern in (subject, endpoint, obj):
            validate_pattern(pattern)
        conditions = parse_conditions(cond)
    except ValueError as exc:
        raise _refuse(line.source, line.lineno, str(exc)) from exc
    if action != ANY_ACTION and action not in ACTIONS:
        known = ", ".join(sorted(ACTIONS))
        raise _refuse(line.source, line.lineno, f"unknown action {action!r} (known: {known}, *)")
    if effect not in EFFECTS:
        raise _refuse(line.source, line.lineno, f"the effect must be allow or deny, not {effect!r}")
    return Rule(line, order, subject, endpoint, obj, action, conditions, effect)


def parse_policy(text: str, source: str) -> tuple[PolicyLine, ...]:
    """Every line of a policy text, validated; the first broken line raises."""
    out: list[PolicyLine] = []
    # Split on "\n" only, as Casbin's file adapter does (not on other line breaks).
    for lineno, raw in enumerate(text.split("\n"), start=1):
        line = parse_policy_line(raw, source, lineno)
        if line is not None:
            if line.ptype == "p":
                rule_from_line(line, 0)
            out.append(line)
    return tuple(out)
