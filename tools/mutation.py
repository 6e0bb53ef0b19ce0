"""Mutation scores of the security-critical modules: ``make mutation``.

Runs mutmut 3 (configured in ``[tool.mutmut]`` of pyproject.toml: which modules, which
tests) and prints one line per module: mutants, killed, survived, equivalent and the
score ``killed / (mutants - equivalent)``. Exits 1 when a module scores below the
threshold (0.9), 2 when mutmut itself cannot run (for instance the clean test run
fails).

Why mutmut: it mutates a ``src/`` layout as it is (a copy in ``./mutants``), runs pytest
in-process and forks every mutant from one warm interpreter, and records which tests
reach which function, so each mutant runs only the tests that exercise it. That keeps a
run over ~1,200 mutants to minutes on two cores. It mutates function bodies only, not
module-level constants; those tables (dangerous environment names, reason codes) are
pinned by tests that check each entry.

Counting: a mutant is *killed* when a test failed (mutmut's ``killed``) or it made the
tests hang or crash (``timeout``, ``segfault``): either way the suite noticed. ``no
tests`` (no selected test reaches the function), ``survived`` and ``suspicious`` count
as not killed. *Equivalent* mutants — no behaviour can tell them from the original —
are listed with the reason in ``tools/mutation-equivalents.toml`` and matched by
function and changed line, so the list survives renumbering.

Deliberately not here: choosing tests (mutmut does, from its coverage records) and
writing docs/security.md (copy the ``--markdown`` table there by hand).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import difflib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENTS = ROOT / "tools" / "mutation-equivalents.toml"
THRESHOLD = 0.9
DETECTED = {"killed", "timeout", "segfault"}
# mutmut's exit codes per mutant (mutmut.stats.status_by_exit_code, mutmut 3.8).
STATUS_BY_EXIT_CODE = {
    0: "survived",
    1: "killed",
    3: "killed",
    5: "no tests",
    33: "no tests",
    34: "skipped",
    36: "timeout",
    37: "caught by type check",
    -24: "timeout",
    24: "timeout",
    152: "timeout",
    255: "timeout",
    -11: "segfault",
    -9: "segfault",
}


@dataclass
class Equivalent:
    module: str
    function: str
    original: str
    mutant: str
    why: str
    used: int = 0


@dataclass
class ModuleScore:
    module: str
    statuses: Counter[str] = field(default_factory=Counter)
    equivalent: list[str] = field(default_factory=list)
    not_killed: list[tuple[str, str, str]] = field(default_factory=list)  # name, status, diff

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    @property
    def killed(self) -> int:
        return sum(n for status, n in self.statuses.items() if status in DETECTED)

    @property
    def survived(self) -> int:
        return self.total - self.killed - len(self.equivalent)

    @property
    def score(self) -> float:
        counted = self.total - len(self.equivalent)
        return self.killed / counted if counted else 1.0


def modules() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return list(config["tool"]["mutmut"]["only_mutate"])


def load_equivalents() -> list[Equivalent]:
    if not EQUIVALENTS.exists():
        return []
    data = tomllib.loads(EQUIVALENTS.read_text(encoding="utf-8"))
    return [Equivalent(**entry) for entry in data.get("equivalent", [])]


def run_mutmut(jobs: int, log: Path) -> int:
    command = [str(Path(sys.executable).parent / "mutmut"), "run", f"--max-children={jobs}"]
    if shutil.which("nice"):
        command = ["nice", "-n", "10", *command]
    with log.open("w", encoding="utf-8") as out:
        return subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode


def function_of(mutant_name: str) -> str:
    """``mepd.auth.xǁ_JwtVerifierǁverify__mutmut_3`` -> ``_JwtVerifier.verify``."""
    base = mutant_name.rsplit("__mutmut_", 1)[0].rsplit(".", 1)[-1]
    if base.startswith("xǁ"):
        return ".".join(part for part in base[2:].split("ǁ") if part)
    return base.removeprefix("x_")


class MutantSources:
    """The original and the mutated body of each mutant, read from mutmut's working copy
    (one parse per module; ``mutmut show`` would start a process per mutant)."""

    def __init__(self, module: str) -> None:
        path = ROOT / "mutants" / module
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        self.functions: dict[str, str] = {}
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and (
                "__mutmut_" in node.name
            ):
                # The body without the def line (its name differs in every mutant).
                self.functions[node.name] = "\n".join(lines[node.lineno : node.end_lineno])

    def diff(self, mutant_name: str) -> str:
        local = mutant_name.rsplit(".", 1)[-1]
        original = self.functions.get(local.rsplit("__mutmut_", 1)[0] + "__mutmut_orig", "")
        mutated = self.functions.get(local, "")
        lines = difflib.unified_diff(
            original.splitlines(), mutated.splitlines(), "original", "mutant", lineterm=""
        )
        return "\n".join(lines)


def changed_lines(diff: str, sign: str) -> list[str]:
    return [
        line[1:].strip()
        for line in diff.splitlines()
        if line.startswith(sign) and not line.startswith(sign * 3)
    ]


def _squeezed(text: str) -> str:
    return re.sub(r"\s+", "", text)


def matches(entry: Equivalent, module: str, name: str, diff: str) -> bool:
    """The mutant is ``entry.original`` replaced by ``entry.mutant`` in the changed lines
    of ``entry.function`` (``*``: any function of the module), and nothing else (compared
    without whitespace, so a mutant that drops a line of a call matches too)."""
    if entry.module != module or entry.function not in ("*", function_of(name)):
        return False
    removed = " ".join(changed_lines(diff, "-"))
    added = " ".join(changed_lines(diff, "+"))
    original, mutant = _squeezed(entry.original), _squeezed(entry.mutant)
    if not original or original not in _squeezed(removed):
        return False
    return _squeezed(removed).replace(original, mutant, 1) == _squeezed(added)


def collect(equivalents: list[Equivalent]) -> list[ModuleScore]:
    scores = []
    for module in modules():
        score = ModuleScore(module)
        meta = ROOT / "mutants" / f"{module}.meta"
        if not meta.exists():
            score.statuses["not generated"] = 0
            scores.append(score)
            continue
        codes = json.loads(meta.read_text(encoding="utf-8"))["exit_code_by_key"]
        sources = MutantSources(module)
        for name, code in sorted(codes.items()):
            status = STATUS_BY_EXIT_CODE.get(code, "not checked" if code is None else "suspicious")
            score.statuses[status] += 1
            if status in DETECTED:
                continue
            diff = sources.diff(name)
            entry = next((e for e in equivalents if matches(e, module, name, diff)), None)
            if entry is not None:
                entry.used += 1
                score.equivalent.append(name)
            else:
                score.not_killed.append((name, status, diff))
        scores.append(score)
    return scores


def table(scores: list[ModuleScore], version: str, markdown: bool) -> str:
    today = datetime.date.today().isoformat()
    head = ("module", "mutants", "killed", "survived", "equivalent", "score", "date", "tool")
    rows = [
        (
            s.module,
            str(s.total),
            str(s.killed),
            str(s.survived),
            str(len(s.equivalent)),
            f"{s.score:.3f}",
            today,
            f"mutmut {version}",
        )
        for s in scores
    ]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join((f"`{r[0]}`", *r[1:])) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*r) for r in [head, *rows])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MUTATION_JOBS", "2")))
    parser.add_argument(
        "--keep", action="store_true", help="reuse ./mutants results (default: start fresh)"
    )
    parser.add_argument("--report-only", action="store_true", help="do not run mutmut")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--show", action="store_true", help="print the diff of every survivor")
    args = parser.parse_args()

    version = importlib.metadata.version("mutmut")
    started = time.monotonic()
    if not args.report_only:
        if not args.keep:
            shutil.rmtree(ROOT / "mutants", ignore_errors=True)
        (ROOT / "mutants").mkdir(exist_ok=True)
        log = ROOT / "mutants" / "mutmut-run.log"
        print(f"mutmut {version}, {args.jobs} workers; log: {log.relative_to(ROOT)}", flush=True)
        exit_status = run_mutmut(args.jobs, log)
        if exit_status != 0:
            tail = log.read_text(encoding="utf-8", errors="replace")[-4000:]
            print(tail.replace("\r", "\n"), file=sys.stderr)
            print(f"mutmut run failed with status {exit_status}", file=sys.stderr)
            return 2
    equivalents = load_equivalents()
    scores = collect(equivalents)
    print(table(scores, version, args.markdown))
    if not args.report_only:
        print(f"\n{time.monotonic() - started:.0f} s")
    for s in scores:
        for name, status, diff in s.not_killed:
            print(f"\n{status}: {name}")
            if args.show:
                print(diff)
    for entry in equivalents:
        if entry.used == 0:
            print(f"\nnote: equivalent entry not matched: {entry.module} {entry.function}")
    low = [s.module for s in scores if s.score < THRESHOLD]
    if low:
        print(f"\nbelow {THRESHOLD}: {', '.join(low)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
