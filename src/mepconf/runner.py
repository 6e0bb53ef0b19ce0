"""Running selected cases through an adapter and judging each observation.

Verdicts: ``pass``, ``fail`` (the deployment did something else than expected),
``skip`` (the target lacks an op or a deployment property the case needs, with the
reason; never counted as passed), ``error`` (the adapter or the deployment broke, so
nothing was judged). A deployment's expected-failures file turns a ``fail``/``error``
of a listed case into ``xfail``, and a listed case that passes into ``xpass``
(an unexpected pass, which fails the run so the file is kept honest).
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import attrs

from mepconf.adapters import Adapter, AdapterError, Observation, Skip
from mepconf.compare import compare
from mepconf.suite import Case

PASS, FAIL, SKIP, ERROR, XFAIL, XPASS = "pass", "fail", "skip", "error", "xfail", "xpass"


@attrs.frozen
class CaseResult:
    case: Case
    status: str
    message: str = ""
    seconds: float = 0.0


@attrs.frozen
class ExpectedFailures:
    """Case ids (or prefixes ending in ``*``) a deployment knows it fails, with why."""

    entries: Mapping[str, str] = attrs.field(factory=dict)

    @classmethod
    def from_file(cls, path: Path) -> ExpectedFailures:
        """JSON ``{"expected_failures": [{"id": …, "reason": …}]}`` or one id per line
        (``#`` starts a comment; text after the id on a line is the reason)."""
        text = path.read_text(encoding="utf-8")
        stripped = text.lstrip()
        if stripped.startswith("{"):
            doc = json.loads(text)
            items = doc.get("expected_failures") if isinstance(doc, dict) else None
            if not isinstance(items, list):
                raise ValueError(f"{path}: expected an object with a list 'expected_failures'")
            entries: dict[str, str] = {}
            for i, item in enumerate(items):
                if not isinstance(item, dict) or not isinstance(item.get("id"), str):
                    raise ValueError(f"{path}: $.expected_failures[{i}] needs a string id")
                entries[item["id"]] = str(item.get("reason", ""))
            return cls(entries)
        entries = {}
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                ident, _, reason = line.partition(" ")
                entries[ident] = reason.strip()
        return cls(entries)

    def lookup(self, case_id: str) -> str | None:
        for pattern, reason in self.entries.items():
            if pattern.endswith("*"):
                if case_id.startswith(pattern[:-1]):
                    return reason
            elif pattern == case_id:
                return reason
        return None


def judge(case: Case, observed: Observation) -> list[str]:
    """Every way ``observed`` differs from ``case.expect`` (empty when it passes)."""
    expect = case.expect
    if "result" in expect:
        if observed.error is not None:
            err = observed.error
            return [f"expected a result, got error {err.reason}: {err.message}".rstrip(": ")]
        return compare(expect["result"], observed.result, exact=expect.get("match") == "exact")
    want = expect["error"]
    if observed.error is None:
        return [f"expected error {want}, got result {json.dumps(observed.result)[:300]}"]
    err = observed.error
    problems = []
    if err.reason != want:
        problems.append(f"expected error {want}, got error {err.reason}: {err.message}")
    for vpath in expect.get("violations", []):
        if vpath not in err.violations:
            problems.append(f"expected a violation at {vpath}, got {list(err.violations)}")
    if "details" in expect:
        problems.extend(compare(expect["details"], dict(err.details), path="$.details"))
    return problems


def run_case(
    adapter: Adapter, case: Case, ops: frozenset[str], props: frozenset[str]
) -> tuple[str, str]:
    if case.op not in ops:
        return SKIP, f"op {case.op} is not supported by the {adapter.name} adapter"
    missing = [n for n in case.needs if n not in props]
    if missing:
        return SKIP, f"needs {', '.join(missing)}, which this deployment does not provide"
    try:
        observed = adapter.execute(case)
    except Skip as exc:
        return SKIP, str(exc) or "skipped by the adapter"
    except AdapterError as exc:
        return ERROR, f"adapter error: {exc}"
    except Exception as exc:  # a crash in an adapter is a verdict, not an abort
        tail = traceback.format_exception_only(exc)[-1].strip()
        return ERROR, f"adapter crashed: {tail}"
    problems = judge(case, observed)
    return (FAIL, "; ".join(problems)) if problems else (PASS, "")


def run(
    adapter: Adapter,
    cases: Sequence[Case],
    expected: ExpectedFailures | None = None,
    *,
    clock: Callable[[], float] | None = None,
) -> list[CaseResult]:
    now = clock or time.perf_counter
    expected = expected or ExpectedFailures()
    ops, props = adapter.ops(), adapter.properties()
    results: list[CaseResult] = []
    for case in cases:
        start = now()
        status, message = run_case(adapter, case, ops, props)
        elapsed = now() - start
        why = expected.lookup(case.id)
        if why is not None:
            if status in (FAIL, ERROR):
                message = f"expected failure ({why or 'listed'}): {message}"
                status = XFAIL
            elif status == PASS:
                status, message = XPASS, f"listed as an expected failure ({why}) but passed"
        results.append(CaseResult(case, status, message, elapsed))
    return results


@attrs.frozen
class Summary:
    passed: int
    failed: int
    skipped: int
    errors: int
    xfailed: int
    xpassed: int

    @classmethod
    def of(cls, results: Iterable[CaseResult]) -> Summary:
        counts = dict.fromkeys((PASS, FAIL, SKIP, ERROR, XFAIL, XPASS), 0)
        for r in results:
            counts[r.status] += 1
        return cls(
            counts[PASS], counts[FAIL], counts[SKIP], counts[ERROR], counts[XFAIL], counts[XPASS]
        )

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.errors == 0 and self.xpassed == 0

    def line(self) -> str:
        text = f"{self.passed} passed, {self.failed} failed, {self.skipped} skipped, "
        text += f"{self.errors} errors"
        if self.xfailed:
            text += f", {self.xfailed} expected failures"
        if self.xpassed:
            text += f", {self.xpassed} unexpected passes"
        return text
