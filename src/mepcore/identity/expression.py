"""Expression mapping rules (``expression_identity_mapping#1.0.0``), compiled once.

A rule renders its ``source`` template from an identity's fields, matches the result
against ``match`` (the reference's reduced dialect, or Python's syntax by opt-in: see
``dialect``) over the *whole* string, alternations included, and renders ``output``
from the identity's fields and the match groups.

As in Globus Compute, a rule that cannot be evaluated for an identity — its ``source``
or ``output`` names a field the identity lacks (or has as ``null``), or ``output`` uses a
group that took no part in the match — makes the whole document fail for that identity
set (``ExpressionFailed``): the mapper moves on to the next document, it does not try
this document's later rules. Skipping only the rule would map identities the reference
never maps. An empty output is a result (the empty name), which maps to no account.

Deliberately not here: checks on the produced name (``accounts``) and selection among
mappers (``mapper``).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from mepcore.identity.dialect import RulePattern
from mepcore.identity.template import Template
from mepcore.types import Identity

# Identity strings come from identity providers; a bound on what a regex is run on
# keeps an admin's backtracking-prone pattern from becoming a denial of service.
MAX_SOURCE_LENGTH = 1024


class ExpressionFailed(Exception):
    """A rule could not be evaluated for an identity; the message says why (for the
    administrator)."""


def _used_groups(output: Template) -> tuple[int, ...]:
    return tuple(sorted({p for _, p in output.parts if isinstance(p, int)}))


@attrs.frozen
class ExpressionRule:
    source: Template
    pattern: RulePattern
    output: Template
    groups_used: tuple[int, ...] = attrs.field(init=False)

    @groups_used.default
    def _groups_used(self) -> tuple[int, ...]:
        return _used_groups(self.output)

    def apply(self, identity: Identity) -> str | None:
        """The name this rule produces for ``identity`` (possibly empty), or None when it
        does not match. Raises ``ExpressionFailed`` (see the module docstring)."""
        subject = self.source.render(identity.fields)
        if subject is None:
            raise ExpressionFailed(_missing(self.source, identity, "source"))
        if len(subject) > MAX_SOURCE_LENGTH:
            return None
        match = self.pattern.fullmatch(subject)
        if match is None:
            return None
        groups = match.groups()
        for group in self.groups_used:
            if groups[group] is None:
                raise ExpressionFailed(f"output: group {{{group}}} took no part in the match")
        name = self.output.render(identity.fields, groups)
        if name is None:
            raise ExpressionFailed(_missing(self.output, identity, "output"))
        return name


def _missing(template: Template, identity: Identity, where: str) -> str:
    absent = sorted(
        name for name in template.field_names if not isinstance(identity.fields.get(name), str)
    )
    fields = ", ".join(f"{{{name}}}" for name in absent)
    return f"{where}: identity {identity.id} has no {fields} (missing, null or not a string)"


@attrs.frozen
class ExpressionMapper:
    """One expression document: its rules in order."""

    rules: tuple[ExpressionRule, ...]

    def matches(self, identities: Sequence[Identity]) -> list[tuple[int, Identity, str]]:
        """``(rule index, identity, name)`` for every rule that matches an identity: by
        rule, then in the order of ``identities``. Every rule is tried on every identity
        (as the reference does); ``ExpressionFailed`` when any of them cannot be
        evaluated, naming the rule."""
        found: list[tuple[int, Identity, str]] = []
        for index, rule in enumerate(self.rules):
            for identity in identities:
                try:
                    name = rule.apply(identity)
                except ExpressionFailed as exc:
                    raise ExpressionFailed(f"mappings[{index}].{exc}") from exc
                if name is not None:
                    found.append((index, identity, name))
        return found
