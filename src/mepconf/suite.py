"""Loading the conformance suite: requirements, case files, fixtures; and checking it.

A suite folder holds ``requirements.json``, ``schema/case.schema.json``,
``cases/<area>/<topic>.json`` and ``fixtures/``. Case files are untrusted data: each is
validated against the case schema before anything reads it, and fixture references
may not leave the fixtures folder. ``Suite.check`` reports every problem of the suite
itself (the ``check`` command); ``Suite.load`` refuses a suite with problems.

This module deliberately knows nothing about what an operation means: it produces
fully resolved ``Case`` values (fixtures substituted, file defaults merged) that the
runner hands to an adapter.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

import attrs
import jsonschema

LEVELS = ("MUST", "SHOULD", "MAY")
_REQUIREMENT_ID = re.compile(r"^MEP-[A-Z]+-[0-9]{3}$")


class SuiteError(Exception):
    """The suite itself is broken (bad case file, unknown requirement, missing fixture)."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(self.problems[:5]))


@attrs.frozen
class Requirement:
    id: str
    level: str
    area: str
    text: str


@attrs.frozen
class Case:
    """One resolved case, ready for an adapter."""

    id: str
    requirement: str
    description: str
    op: str
    given: Mapping[str, Any]
    input: Any
    expect: Mapping[str, Any]
    needs: tuple[str, ...]
    file: str

    def to_wire(self) -> dict[str, Any]:
        """The JSON form adapters of other implementations receive (exec protocol)."""
        return {
            "id": self.id,
            "requirement": self.requirement,
            "op": self.op,
            "given": dict(self.given),
            "input": self.input,
            "needs": list(self.needs),
        }


def default_suite_dir() -> Path:
    """The packaged suite (``mepconf/suite`` in a wheel), else ``<repo>/conformance``."""
    try:
        packaged = resources.files("mepconf") / "suite"
        if packaged.is_dir():
            return Path(str(packaged))
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - odd installs
        pass
    return Path(__file__).resolve().parents[2] / "conformance"


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise SuiteError([f"{path}: cannot read: {exc}"]) from exc
    except json.JSONDecodeError as exc:
        raise SuiteError([f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}"]) from exc


@attrs.frozen
class Suite:
    root: Path
    requirements: Mapping[str, Requirement]
    cases: tuple[Case, ...]

    @classmethod
    def load(cls, root: Path) -> Suite:
        suite, problems = cls.read(root, coverage=False)
        if problems:
            raise SuiteError(problems)
        return suite

    @classmethod
    def read(cls, root: Path, *, coverage: bool = True) -> tuple[Suite, list[str]]:
        """Read the suite and list every problem found (empty when the suite is sound).

        ``coverage`` adds the requirements no case covers to the problems (``check``
        wants them; running a partial suite does not).
        """
        problems: list[str] = []
        root = root.resolve()
        requirements = _read_requirements(root / "requirements.json", problems)
        schema = _load_json(root / "schema" / "case.schema.json")
        validator_cls = jsonschema.validators.validator_for(schema)
        try:
            validator_cls.check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise SuiteError([f"schema/case.schema.json: {exc.message}"]) from exc
        validator = validator_cls(schema)
        fixtures = _Fixtures(root / "fixtures")
        cases: list[Case] = []
        cases_dir = root / "cases"
        files = sorted(cases_dir.glob("*/*.json")) if cases_dir.is_dir() else []
        if not files:
            problems.append("cases/: no case files")
        for path in files:
            rel = path.relative_to(root).as_posix()
            try:
                doc = _load_json(path)
            except SuiteError as exc:
                problems.extend(exc.problems)
                continue
            errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
            if errors:
                problems.extend(
                    f"{rel}: {_json_path(e.absolute_path)}: {e.message}" for e in errors
                )
                continue
            cases.extend(_cases_of_file(rel, path, doc, fixtures, problems))
        _cross_check(requirements, cases, problems, coverage=coverage)
        return cls(root, MappingProxyType(requirements), tuple(cases)), problems

    def select(self, prefixes: Iterable[str] = ()) -> list[Case]:
        chosen = [p for p in prefixes if p]
        if not chosen:
            return list(self.cases)
        return [c for c in self.cases if any(_selected(c, p) for p in chosen)]


def _selected(case: Case, prefix: str) -> bool:
    # A prefix selects by case id ("identity/expr") or by requirement ("MEP-ID-00").
    return case.id.startswith(prefix) or case.requirement.startswith(prefix)


def _json_path(parts: Iterable[Any]) -> str:
    out = "$"
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _read_requirements(path: Path, problems: list[str]) -> dict[str, Requirement]:
    doc = _load_json(path)
    out: dict[str, Requirement] = {}
    items = doc.get("requirements") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        problems.append("requirements.json: expected an object with a list 'requirements'")
        return out
    for i, item in enumerate(items):
        where = f"requirements.json: $.requirements[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{where}: expected an object")
            continue
        rid, level, text = item.get("id"), item.get("level"), item.get("text")
        area = item.get("area", "")
        if not isinstance(rid, str) or not _REQUIREMENT_ID.match(rid):
            problems.append(f"{where}.id: expected an id like MEP-ID-001, got {rid!r}")
            continue
        if level not in LEVELS:
            problems.append(f"{where}.level: expected one of {', '.join(LEVELS)}")
            continue
        if not isinstance(text, str) or not text.strip():
            problems.append(f"{where}.text: expected one sentence")
            continue
        if rid in out:
            problems.append(f"{where}.id: duplicate requirement id {rid}")
            continue
        unknown = set(item) - {"id", "level", "area", "text"}
        if unknown:
            problems.append(f"{where}: unknown keys {sorted(unknown)}")
        out[rid] = Requirement(rid, level, str(area), text)
    return out


class _Fixtures:
    """Resolves ``{"$fixture": "rel/path"}`` (content) and ``{"$fixture_path": …}`` (path)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def _path(self, rel: str) -> Path:
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root):
            raise SuiteError([f"fixture {rel!r} leaves the fixtures folder"])
        if not path.is_file():
            raise SuiteError([f"fixture {rel!r} does not exist"])
        return path

    def resolve(self, value: Any) -> Any:
        if isinstance(value, dict):
            if set(value) == {"$fixture"} and isinstance(value["$fixture"], str):
                path = self._path(value["$fixture"])
                if path.suffix == ".json":
                    return self.resolve(_load_json(path))
                return path.read_text(encoding="utf-8")
            if set(value) == {"$fixture_path"} and isinstance(value["$fixture_path"], str):
                return str(self._path(value["$fixture_path"]))
            return {k: self.resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        return value


def _cases_of_file(
    rel: str, path: Path, doc: Mapping[str, Any], fixtures: _Fixtures, problems: list[str]
) -> list[Case]:
    area, topic = path.parent.name, path.stem
    defaults: Mapping[str, Any] = doc.get("defaults", {})
    out: list[Case] = []
    for i, raw in enumerate(doc["cases"]):
        where = f"{rel}: $.cases[{i}]"
        cid = raw["id"]
        if not cid.startswith(f"{area}/{topic}/"):
            problems.append(f"{where}.id: {cid!r} must start with {area}/{topic}/")
        op = raw.get("op", defaults.get("op"))
        requirement = raw.get("requirement", defaults.get("requirement"))
        if not op:
            problems.append(f"{where}: no op (neither in the case nor in the file defaults)")
            continue
        if not requirement:
            problems.append(f"{where}: no requirement (neither in the case nor in defaults)")
            continue
        given = {**defaults.get("given", {}), **raw.get("given", {})}
        needs = tuple(dict.fromkeys([*defaults.get("needs", []), *raw.get("needs", [])]))
        try:
            case = Case(
                id=cid,
                requirement=requirement,
                description=raw["description"],
                op=op,
                given=MappingProxyType(fixtures.resolve(given)),
                input=fixtures.resolve(raw.get("input", {})),
                expect=MappingProxyType(fixtures.resolve(raw["expect"])),
                needs=needs,
                file=rel,
            )
        except SuiteError as exc:
            problems.extend(f"{where}: {p}" for p in exc.problems)
            continue
        out.append(case)
    return out


def _cross_check(
    requirements: Mapping[str, Requirement],
    cases: Sequence[Case],
    problems: list[str],
    *,
    coverage: bool,
) -> None:
    seen: dict[str, str] = {}
    used: set[str] = set()
    for case in cases:
        if case.id in seen:
            problems.append(f"{case.file}: duplicate case id {case.id} (also in {seen[case.id]})")
        seen.setdefault(case.id, case.file)
        if case.requirement not in requirements:
            problems.append(f"{case.file}: {case.id}: unknown requirement {case.requirement}")
        used.add(case.requirement)
    for rid, req in requirements.items():
        if coverage and rid not in used:
            kind = "MUST requirement" if req.level == "MUST" else "requirement"
            problems.append(f"requirements.json: {kind} {rid} has no case")
