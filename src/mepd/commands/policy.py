"""``mepd policy``: run decision tables against policies, and explain one decision.

``mepd policy test [--model FILE] [--policy FILE ...] [--config FILE [--endpoint NAME]]
[--run REGEX] [--coverage] [--json] [PATH ...]`` loads every decision table
(``*.yaml``/``*.yml`` files, or folders searched recursively), decides each case, prints
one line per case and ends with ``N passed, M failed`` (``--json``: one JSON document
with ``passed``, ``failed``, ``cases`` and, with ``--coverage``, ``coverage``; an
unusable table is ``{"error": …}``); exit 0 only when every case passed. ``--coverage``
lists the policy lines no case touched. ``mepd policy explain`` prints one decision
with its reason and lines as JSON (exit 0 allowed, 1 denied).

What a table is decided against, first that applies: the endpoint's model and policy
list (``--config``, and ``mepd check`` for an endpoint's ``policy_tests``), the
``--policy`` files, the table's own ``policy``. There is one table format, described in
``policies/README.md``, and this module is its only reader (``mepd check`` calls
``endpoint_table_problems``). Tables are validated with a JSON Schema and loaded with
duplicate keys refused. Deliberately not here: editing policies, or talking to a
running daemon.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from mepcore.authz import Authorizer, Decision
    from mepd.settings import EndpointSettings

EXIT_OK = 0
EXIT_NEGATIVE = 1
EXIT_USAGE = 2

TABLE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["cases"],
    "properties": {
        "description": {"type": "string"},
        "model": {"type": "string", "minLength": 1},
        "policy": {
            "oneOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
            ]
        },
        "now": {"type": ["string", "number"]},
        "timezone": {"type": "string", "pattern": "^[+-][0-9]{2}:[0-9]{2}$|^UTC$"},
        "cases": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "request", "expect"],
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "request": {"type": "object"},
                    "expect": {"enum": ["allow", "deny"]},
                    "reason": {"type": "string"},
                    "line": {"type": ["integer", "string"]},
                    "now": {"type": ["string", "number"]},
                },
            },
        },
    },
}


class ConfigProblem(Exception):
    """A table, model or policy that cannot be used (exit 2)."""


@attrs.frozen
class PolicyFiles:
    """What tables are decided against when the tables do not say: a model (None: the
    shipped one), policy files merged in order, and the endpoint a request without
    ``endpoint`` is about (an endpoint's own tables)."""

    model: Path | None
    policies: tuple[Path, ...]
    endpoint: str | None = None

    @classmethod
    def of_endpoint(cls, ep: EndpointSettings) -> PolicyFiles:
        return cls(ep.policy_model, tuple(ep.policy), ep.name)


@attrs.frozen
class _FixedClock:
    """The clock of a decision table: always the table's (or case's) ``now``."""

    wall: float

    def now(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.wall


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="policy_command", metavar="ACTION")
    test = sub.add_parser("test", help="run decision tables (files or folders)")
    test.add_argument(
        "--model", help="model file for every table (default: the table's, else the shipped model)"
    )
    test.add_argument("--run", metavar="REGEX", help="only cases whose 'file::name' matches")
    test.add_argument(
        "--coverage", action="store_true", help="list policy lines that no case touched"
    )
    test.add_argument("--json", action="store_true", help="print the results as one JSON document")
    test.add_argument(
        "--policy",
        action="append",
        metavar="FILE",
        help="decide every table with these policy files, merged in order (repeat)",
    )
    _add_endpoint_arguments(test, "run its policy_tests (or the PATHs) against its policy")
    test.add_argument("paths", nargs="*", metavar="PATH", help="tables (default: policies)")
    explain = sub.add_parser("explain", help="explain one decision as JSON")
    explain.add_argument("--model", help="model file (default: the shipped model)")
    explain.add_argument(
        "--policy",
        action="append",
        metavar="FILE",
        help="policy file (repeat for several, merged in order)",
    )
    _add_endpoint_arguments(explain, "decide with its model and policy list")
    explain.add_argument(
        "--request", required=True, metavar="JSON", help="the request as a JSON object, or @FILE"
    )
    explain.add_argument("--now", help="the time to decide at (ISO 8601 or epoch seconds)")


def _add_endpoint_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--config", metavar="FILE", help=f"the settings YAML: each endpoint's, {what}"
    )
    parser.add_argument("--endpoint", metavar="NAME", help="only this endpoint of --config")


def run(args: argparse.Namespace) -> int:
    command = getattr(args, "policy_command", None)
    try:
        if command == "test":
            return _run_tests(args)
        if command == "explain":
            return _run_explain(args)
    except ConfigProblem as exc:
        sys.stderr.write(f"mepd policy: {exc}\n")
        if getattr(args, "json", False):
            print(json.dumps({"error": str(exc)}))
        return EXIT_USAGE
    sys.stderr.write("mepd policy: choose an action: test or explain\n")
    return EXIT_USAGE


# --- loading -----------------------------------------------------------------------------


def _load_yaml(path: Path) -> Any:
    import yaml

    class _StrictLoader(yaml.SafeLoader):
        pass

    def _mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if key in out:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            out[key] = loader.construct_object(value_node, deep=True)
        return out

    _StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)  # noqa: S506
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigProblem(f"{path}: cannot read the decision table: {exc}") from exc


def _parse_now(value: Any, where: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    try:
        moment = datetime.datetime.fromisoformat(str(value))
    except ValueError as exc:
        raise ConfigProblem(f"{where}: 'now' must be ISO 8601 or epoch seconds") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def _timezone(value: str | None) -> datetime.tzinfo:
    if value is None or value == "UTC":
        return datetime.UTC
    sign = -1 if value[0] == "-" else 1
    hours, minutes = int(value[1:3]), int(value[4:6])
    return datetime.timezone(sign * datetime.timedelta(hours=hours, minutes=minutes))


def _table_files(paths: list[str]) -> Iterator[Path]:
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml"))
            if not found:
                raise ConfigProblem(f"{path}: no decision tables (*.yaml) found")
            yield from found
        elif path.is_file():
            yield path
        else:
            raise ConfigProblem(f"{path}: no such file or folder")


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# --- test ------------------------------------------------------------------------------------


def _line_matches(expected: int | str, lines: tuple[Any, ...]) -> bool:
    if isinstance(expected, int):
        return any(getattr(line, "lineno", None) == expected for line in lines)
    name, _, number = expected.rpartition(":")
    for line in lines:
        source = getattr(line, "source", "")
        if str(getattr(line, "lineno", "")) == number and (
            not name or source == name or source.endswith("/" + name)
        ):
            return True
    return False


def _print(line: str) -> None:
    print(line)


def _discard(line: str) -> None:
    """``--json``: the lines are not printed; the tally keeps the results."""


@attrs.define
class _Tally:
    """What the run has seen so far: results, and the policy lines for ``--coverage``.
    Each result line goes to ``emit`` (stdout for the CLI, a list for ``mepd check``)."""

    emit: Callable[[str], None] = _print
    passed: int = 0
    failed: int = 0
    lines: dict[tuple[str, int], str] = attrs.field(factory=dict)
    touched: set[tuple[str, int]] = attrs.field(factory=set)
    cases: list[dict[str, Any]] = attrs.field(factory=list)

    def record(self, label: str, decision: Decision, problems: list[str]) -> None:
        self.cases.append(
            {
                "case": label,
                "ok": not problems,
                "decision": _verdict(decision),
                "reason": decision.reason,
                "problems": problems,
            }
        )
        if problems:
            self.failed += 1
            self.emit(f"FAIL {label}: {'; '.join(problems)}")
        else:
            self.passed += 1
            self.emit(f"ok   {label}: {_verdict(decision)} ({decision.reason})")

    def untouched(self) -> list[tuple[str, int]]:
        return sorted(key for key in self.lines if key not in self.touched)

    def as_json(self, coverage: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"passed": self.passed, "failed": self.failed, "cases": self.cases}
        if coverage:
            untouched = self.untouched()
            out["coverage"] = {
                "lines": len(self.lines),
                "touched": len(self.lines) - len(untouched),
                "untouched": [
                    {"source": source, "line": lineno, "text": self.lines[(source, lineno)]}
                    for source, lineno in untouched
                ],
            }
        return out

    def print_coverage(self) -> None:
        untouched = sorted(key for key in self.lines if key not in self.touched)
        self.emit(
            f"coverage: {len(self.lines) - len(untouched)} of {len(self.lines)} policy lines "
            f"touched; {len(untouched)} untouched"
        )
        for source, lineno in untouched:
            self.emit(f"  untouched {source}:{lineno}: {self.lines[(source, lineno)]}")


@attrs.frozen
class _DecisionTable:
    """A validated table with its policy and model read: everything to decide its cases."""

    shown: str
    cases: list[dict[str, Any]]
    sources: list[tuple[str, str]]
    model_name: str | None
    model_text: str
    zone: datetime.tzinfo
    now: float | None
    endpoint: str | None = None

    @classmethod
    def load(
        cls, path: Path, model: str | None, files: PolicyFiles | None = None
    ) -> _DecisionTable:
        """Read the table at ``path``, decided against ``files`` when given (an
        endpoint's or ``--policy``), else against the table's own ``policy``; ``model``
        (``--model``) overrides every other model."""
        table = _load_yaml(path)
        shown = _display(path)
        _validate_table(table, shown)
        base = path.parent
        if files is not None:
            policies = list(files.policies)
            own_model = None if files.model is None else str(files.model)
        elif "policy" in table:
            listed = [table["policy"]] if isinstance(table["policy"], str) else table["policy"]
            policies = [base / rel for rel in listed]
            own_model = str(base / table["model"]) if "model" in table else None
        else:
            raise ConfigProblem(
                f"{shown}: the table names no policy: add 'policy', or give --policy or "
                "--config (an endpoint's tables are decided with its policy list)"
            )
        model_name = model or own_model
        return cls(
            shown=shown,
            cases=table["cases"],
            sources=[_read_policy(policy, shown) for policy in policies],
            model_name=model_name,
            model_text=_read_model(model_name),
            zone=_timezone(table.get("timezone")),
            now=_parse_now(table["now"], shown) if "now" in table else None,
            endpoint=None if files is None else files.endpoint,
        )

    def authorizer_at(self, now: float | None) -> Authorizer:
        from mepcore.authz import Authorizer, AuthzConfigError

        try:
            return Authorizer.from_sources(
                self.model_text,
                self.sources,
                clock=_FixedClock(now if now is not None else 0.0),
                model_source=self.model_name or "<shipped model>",
                timezone=self.zone,
            )
        except AuthzConfigError as exc:
            raise ConfigProblem(str(exc)) from exc

    def request_of(self, case: dict[str, Any]) -> dict[str, Any]:
        """The case's request; about this table's endpoint when it names none."""
        request = dict(case["request"])
        if self.endpoint is not None:
            request.setdefault("endpoint", self.endpoint)
        return request


def _validate_table(table: Any, shown: str) -> None:
    import jsonschema

    try:
        jsonschema.validate(table, TABLE_SCHEMA)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        raise ConfigProblem(f"{shown}: {where or '(top)'}: {exc.message}") from exc


def _read_policy(path: Path, shown: str) -> tuple[str, str]:
    try:
        return (_display(path), path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigProblem(f"{shown}: cannot read policy {path}: {exc}") from exc


def _read_model(name: str | None) -> str:
    """The model file's text, or the shipped model's when no file is named."""
    from mepcore.authz import MODEL_TEXT

    try:
        return Path(name).read_text(encoding="utf-8") if name else MODEL_TEXT
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigProblem(f"cannot read model {name}: {exc}") from exc


def _verdict(decision: Decision) -> str:
    return "allow" if decision.allowed else "deny"


def _case_problems(case: dict[str, Any], decision: Decision) -> list[str]:
    """How the decision differs from what the case expects (empty: the case passed)."""
    problems = []
    got = _verdict(decision)
    if got != case["expect"]:
        problems.append(f"expected {case['expect']}, got {got} ({decision.reason})")
    if "reason" in case and case["reason"] != decision.reason:
        problems.append(f"expected reason {case['reason']}, got {decision.reason}")
    if "line" in case and not _line_matches(case["line"], decision.lines):
        shown_lines = (
            ", ".join(getattr(line, "location", str(line)) for line in decision.lines) or "none"
        )
        problems.append(f"expected line {case['line']}, got {shown_lines}")
    return problems


def _run_table(table: _DecisionTable, selector: re.Pattern[str] | None, tally: _Tally) -> None:
    from mepcore.authz import AuthzError, AuthzRequest

    default = table.authorizer_at(table.now)
    tally.lines.update(((line.source, line.lineno), str(line)) for line in default.lines)
    for case in table.cases:
        label = f"{table.shown}::{case['name']}"
        if selector and not selector.search(label):
            continue
        authorizer = (
            table.authorizer_at(_parse_now(case["now"], label)) if "now" in case else default
        )
        # Without a fixed 'now' an 'hours' condition would be decided at the epoch.
        if authorizer.index.uses_hours and "now" not in case and table.now is None:
            raise ConfigProblem(f"{label}: the policy uses 'hours'; give the table a 'now'")
        try:
            request = AuthzRequest.from_mapping(table.request_of(case))
        except AuthzError as exc:
            raise ConfigProblem(f"{label}: {exc}") from exc
        explanation = authorizer.explain(request)
        tally.touched.update((line.source, line.lineno) for line in explanation.touched)
        tally.record(label, explanation.decision, _case_problems(case, explanation.decision))


def endpoint_table_problems(ep: EndpointSettings) -> list[str]:
    """Every failing case (or unusable table) of ``ep.policy_tests``, decided with the
    endpoint's own model and merged policy list; empty when all pass (``mepd check``)."""
    shown: list[str] = []
    tally = _Tally(emit=shown.append)
    files = PolicyFiles.of_endpoint(ep)
    problems: list[str] = []
    for path in ep.policy_tests:
        try:
            _run_table(_DecisionTable.load(path, None, files), None, tally)
        except ConfigProblem as exc:
            problems.append(f"endpoint {ep.name}: policy_tests: {exc}")
    problems += [
        f"endpoint {ep.name}: policy_tests: {line}" for line in shown if line[:4] == "FAIL"
    ]
    return problems


def _endpoints_of(args: argparse.Namespace) -> list[EndpointSettings]:
    """The endpoints ``--config`` (and ``--endpoint``) select."""
    from mepcore.errors import MepError
    from mepd.settings import Settings

    try:
        settings = Settings.from_file(args.config)
    except MepError as exc:
        raise ConfigProblem(f"{args.config}: {exc.detail or exc}") from exc
    chosen = [ep for ep in settings.endpoints if args.endpoint in (None, ep.name)]
    if not chosen:
        raise ConfigProblem(f"{args.config}: no endpoint {args.endpoint!r}")
    return chosen


def _runs(args: argparse.Namespace) -> list[tuple[list[str], PolicyFiles | None]]:
    """The tables to run, each list with what it is decided against."""
    if args.config and args.policy:
        raise ConfigProblem("give --config or --policy, not both")
    if args.endpoint and not args.config:
        raise ConfigProblem("--endpoint needs --config")
    if args.policy:
        files = PolicyFiles(None, tuple(Path(p) for p in args.policy))
        return [(args.paths or ["policies"], files)]
    if args.config:
        runs: list[tuple[list[str], PolicyFiles | None]] = []
        for ep in _endpoints_of(args):
            paths = args.paths or [str(p) for p in ep.policy_tests]
            if paths:
                runs.append((paths, PolicyFiles.of_endpoint(ep)))
        if not runs:
            raise ConfigProblem(f"{args.config}: no policy_tests to run")
        return runs
    return [(args.paths or ["policies"], None)]


def _run_tests(args: argparse.Namespace) -> int:
    selector = re.compile(args.run) if args.run else None
    tally = _Tally(emit=_discard) if args.json else _Tally()
    for paths, files in _runs(args):
        for table_path in _table_files(paths):
            _run_table(_DecisionTable.load(table_path, args.model, files), selector, tally)
    if args.json:
        print(json.dumps(tally.as_json(args.coverage), indent=2))
    else:
        if args.coverage:
            tally.print_coverage()
        print(f"{tally.passed} passed, {tally.failed} failed")
    return EXIT_OK if tally.failed == 0 and tally.passed > 0 else EXIT_NEGATIVE


# --- explain ---------------------------------------------------------------------------------


def _explain_files(args: argparse.Namespace) -> PolicyFiles:
    """The model and policy list ``explain`` decides with: ``--config`` or ``--policy``."""
    if bool(args.config) == bool(args.policy):
        raise ConfigProblem("give --policy FILE (repeatable) or --config FILE --endpoint NAME")
    if args.policy:
        return PolicyFiles(None, tuple(Path(p) for p in args.policy))
    endpoints = _endpoints_of(args)
    if len(endpoints) != 1:
        raise ConfigProblem(f"{args.config} has several endpoints: choose one with --endpoint")
    return PolicyFiles.of_endpoint(endpoints[0])


def _read_request(raw: str, endpoint: str | None) -> Any:
    from mepcore.authz import AuthzError, AuthzRequest

    if raw.startswith("@"):
        try:
            raw = Path(raw[1:]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigProblem(f"cannot read the request: {exc}") from exc
    try:
        data = json.loads(raw)
        if endpoint is not None and isinstance(data, dict):
            data.setdefault("endpoint", endpoint)
        return AuthzRequest.from_mapping(data)
    except json.JSONDecodeError as exc:
        raise ConfigProblem(f"--request is not JSON: {exc}") from exc
    except AuthzError as exc:
        raise ConfigProblem(str(exc)) from exc


def _run_explain(args: argparse.Namespace) -> int:
    from mepcore.authz import Authorizer, AuthzConfigError

    files = _explain_files(args)
    request = _read_request(args.request, files.endpoint)
    now = _parse_now(args.now, "--now") if args.now else None
    sources = [_read_policy(path, "--policy") for path in files.policies]
    model_name = args.model or (None if files.model is None else str(files.model))
    try:
        authorizer = Authorizer.from_sources(
            _read_model(model_name),
            sources,
            model_source=model_name or "<shipped model>",
            clock=_FixedClock(now) if now is not None else None,
        )
    except AuthzConfigError as exc:
        raise ConfigProblem(str(exc)) from exc
    explanation = authorizer.explain(request)
    out = explanation.to_dict()
    out["request"] = request.to_dict()
    print(json.dumps(out, indent=2))
    return EXIT_OK if explanation.decision.allowed else EXIT_NEGATIVE
