"""The identity mapper: a list of mapping documents, loaded once, applied per request.

``IdentityMapper.from_file`` / ``from_json_text`` / ``from_documents`` read a JSON list
of Globus Connect Server mapping documents (a single document is taken as a list of
one), validate each with JSON Schema, compile every regex and template, and refuse
anything wrong with ``IdentityConfigError`` (``identity.mapping_invalid``) whose
violations name the document index and field (``$[1].mappings[0].match``).

Unknown keys are ignored (``warnings`` lists them, with likely mistakes in patterns, for
``mepd check``); ``match`` is read in the reference's dialect unless the document opts
in to Python's syntax (``dialect``).

``IdentityMapper.map`` selects the first mapper (document) with a result and, within
it, the first rule that matches any identity, as Globus Compute does. An expression
document that cannot be evaluated for the identity set (a field it names is missing)
has no result, as there, and is listed in ``MappingResult.skipped``. An empty name from
the deciding rule is no mapping (the search does not go on). Within that rule
(for a program: among its answers) it differs on purpose, so that no client chooses its
account by the order of its linked identities: identities whose ``status`` is not
``used``/``private`` are left out; the primary identity (the token's subject, which the
issuer sets) wins; otherwise the linked identities must agree on one name, and when
they produce different names the mapping is refused (``identity.ambiguous_mapping``).
The result is a function of the primary identity and the *set* of linked identities,
never of their order. The ``MappingResult`` carries every candidate of the mapper that
decided. Mappers after it are not consulted (no program runs for nothing). A failing
external program fails the whole mapping (``IdentityError``); the mappers after it are
*not* tried, because a broken mapper must not silently hand the decision to a looser
one.

Deliberately not here: whether the produced name is an acceptable account
(``check_account``) and any logging (the caller logs with the result or the error).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from os import PathLike
from typing import Any

import attrs

from mepcore.errors import IdentityConfigError, IdentityError, Violation
from mepcore.identity.dialect import (
    GCS_SYNTAX,
    SYNTAX_KEY,
    MatchSyntaxError,
    RulePattern,
    compile_match,
    pattern_warnings,
)
from mepcore.identity.expression import ExpressionFailed, ExpressionMapper, ExpressionRule
from mepcore.identity.external import ExternalMapper
from mepcore.identity.runner import (
    DEFAULT_MAX_OUTPUT,
    DEFAULT_TIMEOUT,
    CommandRunner,
    SubprocessCommandRunner,
)
from mepcore.identity.schema import (
    EXPRESSION_TYPE,
    document_violations,
    json_path,
    unknown_key_warnings,
)
from mepcore.identity.template import Template, TemplateSyntaxError
from mepcore.types import Identity, IdentitySet

MAX_MAPPING_FILE_BYTES = 4 * 1024 * 1024


def _candidate_tuple(value: Sequence[Candidate]) -> tuple[Candidate, ...]:
    return tuple(value)


def _str_tuple(value: Sequence[str]) -> tuple[str, ...]:
    return tuple(value)


def _violation_tuple(value: Sequence[Violation]) -> tuple[Violation, ...]:
    return tuple(value)


@attrs.frozen
class Candidate:
    """A name one rule (or external program) produced for one identity."""

    identity: str
    username: str
    mapper: int
    rule: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "identity": self.identity,
            "username": self.username,
            "mapper": self.mapper,
            "rule": self.rule,
        }


@attrs.frozen
class MappingResult:
    """The outcome of a mapping: the chosen name (None if nothing matched) and why.

    ``rule`` is None for an external program (it has no rules). ``skipped`` says which
    expression documents could not be evaluated for this identity set, and why.
    """

    username: str | None
    matched_identity: str | None
    mapper: int | None
    rule: int | None
    candidates: tuple[Candidate, ...] = attrs.field(converter=_candidate_tuple, default=())
    skipped: tuple[str, ...] = attrs.field(converter=_str_tuple, default=())

    @classmethod
    def from_candidates(cls, candidates: Sequence[Candidate]) -> MappingResult:
        if not candidates:
            return cls(None, None, None, None, ())
        first = candidates[0]
        return cls(first.username, first.identity, first.mapper, first.rule, candidates)

    def to_dict(self) -> dict[str, Any]:
        return {
            "username": self.username,
            "matched_identity": self.matched_identity,
            "mapper": self.mapper,
            "rule": self.rule,
            "candidates": [c.to_dict() for c in self.candidates],
            "skipped": list(self.skipped),
        }


Mapper = ExpressionMapper | ExternalMapper


@attrs.frozen
class IdentityMapper:
    """Mapping documents, compiled, plus how external programs are run."""

    mappers: tuple[Mapper, ...]
    source: str = "<mapping>"
    runner: CommandRunner = attrs.field(factory=SubprocessCommandRunner)
    timeout: float = attrs.field(default=DEFAULT_TIMEOUT)
    max_output: int = attrs.field(default=DEFAULT_MAX_OUTPUT)
    # Not errors: ignored keys and likely mistakes, for ``mepd check`` (loading succeeds).
    warnings: tuple[Violation, ...] = attrs.field(converter=_violation_tuple, default=())

    @timeout.validator
    def _timeout_positive(self, _attr: object, value: float) -> None:
        if not value > 0:
            raise ValueError("timeout must be positive")

    @max_output.validator
    def _max_output_positive(self, _attr: object, value: int) -> None:
        if value <= 0:
            raise ValueError("max_output must be positive")

    @property
    def runs_programs(self) -> bool:
        """True when a mapping may run an external program (seconds, not microseconds)."""
        return any(isinstance(m, ExternalMapper) for m in self.mappers)

    # -- loading -------------------------------------------------------------------

    @classmethod
    def from_documents(
        cls,
        docs: Any,
        *,
        source: str = "<mapping>",
        runner: CommandRunner | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_output: int = DEFAULT_MAX_OUTPUT,
        base_dir: str | None = None,
    ) -> IdentityMapper:
        """Validate and compile already-parsed JSON (a list of documents, or one).

        ``base_dir`` (the mapping file's directory) is where a relative program path
        such as ``./mapper.py`` is found; without it such paths are refused.
        """
        if isinstance(docs, Mapping):
            docs = [docs]
        if not isinstance(docs, list) or not docs:
            raise _config_error(
                source, [Violation("$", "expected a non-empty JSON list of mapping documents")]
            )
        violations: list[Violation] = []
        warnings: list[Violation] = []
        mappers: list[Mapper] = []
        for index, doc in enumerate(docs):
            base = f"$[{index}]"
            found = document_violations(doc, base)
            if not found:
                mapper, found = _compile(doc, base, base_dir)
                if mapper is not None:
                    mappers.append(mapper)
            if not found:
                warnings += unknown_key_warnings(doc, base) + _rule_warnings(doc, base)
            violations.extend(found)
        if violations:
            raise _config_error(source, violations)
        return cls(
            mappers=tuple(mappers),
            source=source,
            runner=runner if runner is not None else SubprocessCommandRunner(),
            timeout=timeout,
            max_output=max_output,
            warnings=warnings,
        )

    @classmethod
    def from_json_text(
        cls,
        text: str | bytes,
        *,
        source: str = "<mapping>",
        runner: CommandRunner | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_output: int = DEFAULT_MAX_OUTPUT,
        base_dir: str | None = None,
    ) -> IdentityMapper:
        try:
            docs = json.loads(
                text, object_pairs_hook=_refuse_duplicate_keys, parse_constant=_refuse_constant
            )
        except (ValueError, RecursionError) as exc:
            raise _config_error(source, [Violation("$", f"not valid JSON: {exc}", "json")]) from exc
        return cls.from_documents(
            docs,
            source=source,
            runner=runner,
            timeout=timeout,
            max_output=max_output,
            base_dir=base_dir,
        )

    @classmethod
    def from_file(
        cls,
        path: str | PathLike[str],
        *,
        runner: CommandRunner | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_output: int = DEFAULT_MAX_OUTPUT,
    ) -> IdentityMapper:
        source = str(path)
        try:
            with open(path, "rb") as handle:
                data = handle.read(MAX_MAPPING_FILE_BYTES + 1)
        except OSError as exc:
            raise IdentityConfigError(
                "identity.mapping_invalid",
                f"{source}: cannot read the mapping file: {exc.strerror or exc}",
            ) from exc
        if len(data) > MAX_MAPPING_FILE_BYTES:
            raise _config_error(
                source, [Violation("$", f"larger than {MAX_MAPPING_FILE_BYTES} bytes", "size")]
            )
        return cls.from_json_text(
            data,
            source=source,
            runner=runner,
            timeout=timeout,
            max_output=max_output,
            base_dir=os.path.dirname(os.path.abspath(path)),
        )

    # -- mapping -------------------------------------------------------------------

    def map(self, identities: IdentitySet) -> MappingResult:
        """Map a linked identity set; ``username`` is None when nothing matched.

        Raises ``IdentityError``: ``identity.mapper_*`` when an external program fails,
        ``identity.ambiguous_mapping`` when linked identities (not the primary one)
        produce different names for the deciding rule.
        """
        ordered = identities.mapping_order()
        primary = identities.primary if ordered and ordered[0] is identities.primary else None
        skipped: list[str] = []
        for index, mapper in enumerate(self.mappers):
            if isinstance(mapper, ExpressionMapper):
                try:
                    matches = mapper.matches(ordered)
                except ExpressionFailed as exc:
                    skipped.append(f"$[{index}].{exc}")
                    continue
                found = [(i, Candidate(i.id, name, index, rule)) for rule, i, name in matches]
            else:
                found = [
                    (i, Candidate(i.id, name, index, None))
                    for i, name in self._run(index, mapper, ordered)
                ]
            if found:
                result = attrs.evolve(_select(found, primary, self.source), skipped=skipped)
                if result.username == "":
                    # The deciding rule produced the empty name: no mapping, and (as in
                    # Globus Compute) no later rule or document is tried.
                    return attrs.evolve(result, username=None, matched_identity=None)
                return result
        return MappingResult(None, None, None, None, (), skipped)

    def _run(
        self, index: int, mapper: ExternalMapper, ordered: Sequence[Identity]
    ) -> list[tuple[Identity, str]]:
        if not ordered:
            return []  # nothing to ask about: no program runs
        try:
            return mapper.matches(
                ordered, self.runner, timeout=self.timeout, max_output=self.max_output
            )
        except IdentityError as exc:
            raise IdentityError(
                exc.admin_reason,
                f"{self.source}: mapper $[{index}]: {exc.detail}",
                violations=exc.violations,
                context={**exc.context, "mapper": index},
            ) from exc


def _select(
    found: Sequence[tuple[Identity, Candidate]], primary: Identity | None, source: str
) -> MappingResult:
    """The deciding mapper's choice among ``found`` (in rule, then mapping order).

    The first rule with a candidate decides (an external program's answers are one
    level). Its candidate for the primary identity wins; otherwise every linked
    identity it matched must give the same name, and the first of them (by id) is
    named as the match. Different names are refused rather than settled by an order:
    the order in a token is the client's, and an order by id would pick an account no
    administrator chose."""
    candidates = [c for _, c in found]
    level = [(i, c) for i, c in found if c.rule == candidates[0].rule]
    chosen = next((c for i, c in level if i is primary), None)
    if chosen is None:
        names = sorted({c.username for _, c in level})
        if len(names) > 1:
            where = f"mapper $[{level[0][1].mapper}]" + (
                "" if level[0][1].rule is None else f".mappings[{level[0][1].rule}]"
            )
            pairs = ", ".join(f"{c.identity} -> {c.username!r}" for _, c in level)
            raise IdentityError(
                "identity.ambiguous_mapping",
                f"{source}: {where}: linked identities map to different names: {pairs}",
                context={"candidates": [c.to_dict() for c in candidates], "names": names},
            )
        chosen = level[0][1]
    return MappingResult(chosen.username, chosen.identity, chosen.mapper, chosen.rule, candidates)


def _compile(
    doc: Mapping[str, Any], base: str, base_dir: str | None
) -> tuple[Mapper | None, list[Violation]]:
    if doc["DATA_TYPE"] != EXPRESSION_TYPE:
        command = tuple(doc["command"])
        program = command[0]
        if "/" in program and not program.startswith("/"):
            # Never relative to the daemon's working directory (not the admin's idea of
            # "here"): relative to the mapping file, or refused.
            if base_dir is None:
                return None, [
                    Violation(
                        json_path(base, ["command", 0]),
                        "must be an absolute path, a bare program name found on PATH,"
                        " or a path relative to the mapping file",
                    )
                ]
            command = (os.path.normpath(os.path.join(base_dir, program)), *command[1:])
        return ExternalMapper(command=command), []
    rules: list[ExpressionRule] = []
    violations: list[Violation] = []
    syntax = doc.get(SYNTAX_KEY, GCS_SYNTAX)
    for position, item in enumerate(doc["mappings"]):
        path = json_path(base, ["mappings", position])
        rule, found = _compile_rule(item, path, syntax)
        violations.extend(found)
        if rule is not None:
            rules.append(rule)
    return ExpressionMapper(rules=tuple(rules)), violations


def _compile_rule(
    item: Mapping[str, Any], path: str, syntax: str
) -> tuple[ExpressionRule | None, list[Violation]]:
    violations: list[Violation] = []
    pattern: RulePattern | None = None
    try:
        pattern = compile_match(
            item["match"],
            ignore_case=item.get("ignore_case", False),
            literal=item.get("literal", False),
            syntax=syntax,
        )
    except MatchSyntaxError as exc:
        violations.append(Violation(f"{path}.match", str(exc), "match"))
    source: Template | None = None
    output: Template | None = None
    try:
        source = Template.parse(item["source"], allow_groups=False)
    except TemplateSyntaxError as exc:
        violations.append(Violation(f"{path}.source", str(exc)))
    try:
        output = Template.parse(item["output"], allow_groups=True)
    except TemplateSyntaxError as exc:
        violations.append(Violation(f"{path}.output", str(exc)))
    if pattern is not None and output is not None and output.max_group >= pattern.groups:
        violations.append(
            Violation(
                f"{path}.output",
                f"uses group {{{output.max_group}}} but match has {pattern.groups} group(s)"
                " ({0} is the first)",
            )
        )
    if violations or pattern is None or source is None or output is None:
        return None, violations
    return ExpressionRule(source=source, pattern=pattern, output=output), []


def _rule_warnings(doc: Mapping[str, Any], base: str) -> list[Violation]:
    """Likely mistakes in the rules of a valid expression document."""
    if doc["DATA_TYPE"] != EXPRESSION_TYPE:
        return []
    syntax = doc.get(SYNTAX_KEY, GCS_SYNTAX)
    found: list[Violation] = []
    for position, item in enumerate(doc["mappings"]):
        output = Template.parse(item["output"], allow_groups=True)
        for field, message, code in pattern_warnings(
            item["match"],
            literal=bool(item.get("literal", False)),
            syntax=syntax,
            output_groups=[p for _, p in output.parts if isinstance(p, int)],
            output_fields=sorted(output.field_names),
            output_text="".join(literal for literal, _ in output.parts),
        ):
            found.append(Violation(json_path(base, ["mappings", position, field]), message, code))
    return found


def _config_error(source: str, violations: Sequence[Violation]) -> IdentityConfigError:
    first = violations[0]
    more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
    return IdentityConfigError(
        "identity.mapping_invalid",
        f"{source}: {first.path}: {first.message}{more}",
        violations=violations,
    )


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
