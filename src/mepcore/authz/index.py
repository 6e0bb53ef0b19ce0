"""The fast evaluator: the shipped model's matcher over an index of policy lines.

Plain Casbin evaluates the matcher once per policy line per request. Here the ``p``
lines are sorted into a four-level tree keyed by action, endpoint, subject and object;
each level keeps literal keys in a dict and wildcard patterns bucketed by their
literal prefix (``patterns.literal_prefix``), so a request visits only the lines that
can match it. Role (``g``, per endpoint) and object-set (``g2``) membership is
precomputed at load time as the set of names reachable from each member within the
same depth Casbin's role manager searches (``ROLE_DEPTH``).

For a request, a line matches exactly when the shipped matcher holds:

- endpoint: ``segmentMatch(r.dom, p.dom)``;
- action: ``p.act == "*"`` or equal;
- subject: some principal ``s`` has ``g(s, p.sub, r.dom)`` (``p.sub`` is ``s`` or one of
  its roles in this endpoint) or ``segmentMatch(s, p.sub)``. Role names are literal, so
  a literal ``p.sub`` is looked up among principals and their roles, and a pattern is
  tried against the principals only;
- object: ``g2(r.obj, p.obj)`` or ``segmentMatch(r.obj, p.obj)``, likewise;
- conditions: every predicate holds.

Equality with a plain ``casbin.Enforcer`` is proved by a differential property test.
Deliberately not here: the decision cache and the clock (see ``authorizer``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

from mepcore.authz.patterns import is_pattern, literal_prefix, pattern_regex, value_prefixes
from mepcore.authz.policy import ANY_ACTION, PolicyLine, Rule, rule_from_line
from mepcore.authz.predicates import RequestContext

# Casbin's default role manager gives up after this many links (max_hierarchy_level 10,
# searched while level > 0); membership deeper than this does not count there, so it
# does not count here either.
ROLE_DEPTH = 9


class _Level:
    """One level of the index: literal keys and prefix-bucketed patterns."""

    __slots__ = ("by_pattern", "literal", "patterns")

    def __init__(self) -> None:
        self.literal: dict[str, Any] = {}
        self.patterns: dict[str, list[tuple[re.Pattern[str], Any]]] = {}
        self.by_pattern: dict[str, Any] = {}

    def child(self, key: str, factory: type) -> Any:
        if not is_pattern(key):
            node = self.literal.get(key)
            if node is None:
                node = self.literal[key] = factory()
            return node
        node = self.by_pattern.get(key)
        if node is None:
            node = self.by_pattern[key] = factory()
            bucket = self.patterns.setdefault(literal_prefix(key), [])
            bucket.append((re.compile(pattern_regex(key)), node))
        return node

    def find(self, literal_keys: Iterable[str], pattern_values: Iterable[str]) -> Iterator[Any]:
        """Children whose key is one of ``literal_keys`` or a pattern matching one of
        ``pattern_values``; each child at most once."""
        literal = self.literal
        if literal:
            for key in literal_keys:
                node = literal.get(key)
                if node is not None:
                    yield node
        if self.patterns:
            seen: set[int] = set()
            for value in pattern_values:
                for prefix in value_prefixes(value):
                    for regex, node in self.patterns.get(prefix, ()):
                        if id(node) not in seen and regex.fullmatch(value):
                            seen.add(id(node))
                            yield node


def _closures(edges: dict[str, set[str]]) -> dict[str, frozenset[str]]:
    """For each member, itself and every name reachable within ``ROLE_DEPTH`` links."""
    out: dict[str, frozenset[str]] = {}
    for start in edges:
        reached = {start}
        frontier = {start}
        for _ in range(ROLE_DEPTH):
            frontier = {role for name in frontier for role in edges.get(name, ())} - reached
            if not frontier:
                break
            reached |= frontier
        out[start] = frozenset(reached)
    return out


class Match:
    """The lines a request matched: allow and deny lines whose conditions held, and
    lines that matched except for their conditions."""

    __slots__ = ("allow", "condition_failed", "deny")

    def __init__(self) -> None:
        self.allow: list[Rule] = []
        self.deny: list[Rule] = []
        self.condition_failed: list[Rule] = []


class PolicyIndex:
    """Every line of a policy, indexed for evaluation. Read-only after construction."""

    def __init__(self, lines: Iterable[PolicyLine]) -> None:
        self.lines: tuple[PolicyLine, ...] = tuple(lines)
        self.rules: list[Rule] = []
        self._by_action: dict[str, _Level] = {}
        role_edges: dict[str, dict[str, set[str]]] = {}
        set_edges: dict[str, set[str]] = {}
        self.role_lines: dict[str, list[PolicyLine]] = {}
        self.set_lines: list[PolicyLine] = []
        auth_ages: set[int] = set()
        uids: set[int] = set()
        self.uses_hours = False
        for line in self.lines:
            if line.ptype == "g":
                member, role, domain = line.fields
                role_edges.setdefault(domain, {}).setdefault(member, set()).add(role)
                self.role_lines.setdefault(domain, []).append(line)
            elif line.ptype == "g2":
                member, group = line.fields
                set_edges.setdefault(member, set()).add(group)
                self.set_lines.append(line)
            else:
                rule = rule_from_line(line, len(self.rules))
                self.rules.append(rule)
                for pred in rule.conditions:
                    if pred.name == "auth_age_le":
                        auth_ages.add(int(pred.argument))
                    elif pred.name == "uid_ge":
                        uids.add(int(pred.argument))
                    elif pred.name == "hours":
                        self.uses_hours = True
                by_endpoint = self._by_action.get(rule.action)
                if by_endpoint is None:
                    by_endpoint = self._by_action[rule.action] = _Level()
                by_subject = by_endpoint.child(rule.endpoint, _Level)
                by_object = by_subject.child(rule.subject, _Level)
                by_object.child(rule.obj, list).append(rule)
        self.role_closure = {dom: _closures(edges) for dom, edges in role_edges.items()}
        self.set_closure = _closures(set_edges)
        # Sorted thresholds: a request's position among them decides every
        # auth_age_le / uid_ge predicate, which makes exact cache keys possible.
        self.auth_age_thresholds: tuple[int, ...] = tuple(sorted(auth_ages))
        self.uid_thresholds: tuple[int, ...] = tuple(sorted(uids))

    def subject_keys(self, principals: Iterable[str], endpoint: str) -> set[str]:
        """The principals and every role they hold in this endpoint."""
        closure = self.role_closure.get(endpoint)
        if closure is None:
            return set(principals)
        keys: set[str] = set()
        for principal in principals:
            reached = closure.get(principal)
            if reached is None:
                keys.add(principal)
            else:
                keys |= reached
        return keys

    def object_keys(self, obj: str) -> frozenset[str]:
        """The object and every set it belongs to."""
        return self.set_closure.get(obj) or frozenset((obj,))

    def match(
        self,
        endpoint: str,
        obj: str,
        action: str,
        principals: tuple[str, ...],
        ctx: RequestContext,
    ) -> Match:
        result = Match()
        subject_keys: set[str] | None = None
        object_keys: frozenset[str] | None = None
        single_endpoint = (endpoint,)
        single_object = (obj,)
        for action_key in (action, ANY_ACTION):
            by_endpoint = self._by_action.get(action_key)
            if by_endpoint is None:
                continue
            for by_subject in by_endpoint.find(single_endpoint, single_endpoint):
                if subject_keys is None:
                    subject_keys = self.subject_keys(principals, endpoint)
                for by_object in by_subject.find(subject_keys, principals):
                    if object_keys is None:
                        object_keys = self.object_keys(obj)
                    for rules in by_object.find(object_keys, single_object):
                        for rule in rules:
                            if all(pred.test(ctx) for pred in rule.conditions):
                                (result.allow if rule.effect == "allow" else result.deny).append(
                                    rule
                                )
                            else:
                                result.condition_failed.append(rule)
        return result

    def touched_links(
        self, endpoint: str, obj: str, principals: tuple[str, ...], rules: Iterable[Rule]
    ) -> list[PolicyLine]:
        """The ``g``/``g2`` lines that lead from the request to the given rules' literal
        subjects and objects (for coverage reports; not used to decide)."""
        rules = list(rules)
        subject_keys = self.subject_keys(principals, endpoint)
        object_keys = self.object_keys(obj)
        closure = self.role_closure.get(endpoint, {})
        targets = {r.subject for r in rules}
        out: list[PolicyLine] = []
        for line in self.role_lines.get(endpoint, ()):
            member, role, _ = line.fields
            reach = closure.get(role, frozenset((role,)))
            if member in subject_keys and targets & reach:
                out.append(line)
        object_targets = {r.obj for r in rules}
        for line in self.set_lines:
            member, group = line.fields
            reach = self.set_closure.get(group, frozenset((group,)))
            if member in object_keys and object_targets & reach:
                out.append(line)
        return out
