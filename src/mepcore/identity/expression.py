"""Expression mapping rules (``expression_identity_mapping#1.0.0``), compiled once.

A rule renders its ``source`` template from an identity's fields, matches the result
against ``match`` with ``re.fullmatch`` (the *whole* string, alternations included),
and renders ``output`` from the identity's fields and the match groups. A rule whose
``source`` or ``output`` needs a field the identity lacks does not match that identity;
an empty output is no result.

Deliberately not here: checks on the produced name (``accounts``) and selection among
mappers (``mapper``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import attrs

from mepcore.identity.template import Template
from mepcore.types import Identity

# Identity strings come from identity providers; a bound on what a regex is run on
# keeps an admin's backtracking-prone pattern from becoming a denial of service.
MAX_SOURCE_LENGTH = 1024


@attrs.frozen
class ExpressionRule:
    source: Template
    pattern: re.Pattern[str]
    output: Template

    def apply(self, identity: Identity) -> str | None:
        """The name this rule produces for ``identity``, or None."""
        subject = self.source.render(identity.fields)
        if subject is None or len(subject) > MAX_SOURCE_LENGTH:
            return None
        match = self.pattern.fullmatch(subject)
        if match is None:
            return None
        return self.output.render(identity.fields, match.groups()) or None


@attrs.frozen
class ExpressionMapper:
    """One expression document: its rules in order."""

    rules: tuple[ExpressionRule, ...]

    def matches(self, identities: Sequence[Identity]) -> Iterator[tuple[int, Identity, str]]:
        """``(rule index, identity, name)`` for every rule that matches an identity: by
        rule, then in the order of ``identities``."""
        for index, rule in enumerate(self.rules):
            for identity in identities:
                name = rule.apply(identity)
                if name is not None:
                    yield index, identity, name
