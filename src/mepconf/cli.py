"""``python -m mepconf``: run, list and check the conformance suite.

Exit status: 0 when every selected case passed or was skipped or is an expected
failure that failed; 1 on any unexpected result (fail, error, unexpected pass) or a
broken suite (``check``); 2 on a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

from mepconf.adapters import AdapterError, create_adapter
from mepconf.report import FORMATS, WRITERS
from mepconf.runner import ExpectedFailures, Summary, run
from mepconf.suite import Suite, SuiteError, default_suite_dir

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m mepconf", description="the mep conformance suite")
    parser.add_argument(
        "--suite",
        type=Path,
        help="suite folder (default: the packaged suite or <repo>/conformance)",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run_p = sub.add_parser("run", help="run cases against a deployment")
    run_p.add_argument("--adapter", required=True, choices=("inprocess", "http", "exec"))
    run_p.add_argument("--url", help="http: base URL of the running mepd")
    run_p.add_argument("--profile", help="http: deployment profile (YAML or JSON)")
    run_p.add_argument("--command", dest="exec_command", help="exec: the harness command line")
    run_p.add_argument(
        "--broken",
        help="inprocess: run a deliberately broken variant (prefix-match, permissive-authz, "
        "unescaped-render, no-account-check) to show the suite catches it",
    )
    run_p.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="adapter option"
    )
    _add_select(run_p)
    run_p.add_argument("--expected-failures", type=Path, help="the deployment's known failures")
    run_p.add_argument("--format", choices=FORMATS, default="text")
    run_p.add_argument("--output", type=Path, help="write the report here instead of stdout")

    list_p = sub.add_parser("list", help="list cases")
    _add_select(list_p)
    sub.add_parser("check", help="validate the suite itself")
    return parser


def _add_select(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--select",
        action="append",
        default=[],
        metavar="PREFIX",
        help="only cases whose id or requirement id starts with PREFIX (repeatable)",
    )


def _load(args: argparse.Namespace) -> Suite:
    return Suite.load(args.suite or default_suite_dir())


def _adapter_options(args: argparse.Namespace) -> dict[str, str]:
    options: dict[str, str] = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise AdapterError(f"--option expects KEY=VALUE, got {item!r}")
        options[key] = value
    for key, value in (
        ("url", args.url),
        ("profile", args.profile),
        ("command", args.exec_command),
        ("broken", args.broken),
    ):
        if value is not None:
            options[key] = value
    return options


def cmd_run(args: argparse.Namespace) -> int:
    suite = _load(args)
    cases = suite.select(args.select)
    if not cases:
        sys.stderr.write("mepconf: no case matches the selection\n")
        return EXIT_USAGE
    expected = (
        ExpectedFailures.from_file(args.expected_failures) if args.expected_failures else None
    )
    options = _adapter_options(args)
    with report_stream() as out:
        adapter = create_adapter(args.adapter, options)
        try:
            results = run(adapter, cases, expected)
        finally:
            adapter.close()
        summary = Summary.of(results)
        writer = WRITERS[args.format]
        summary_stream = out
        if args.output:
            with args.output.open("w", encoding="utf-8") as fh:
                writer(results, fh)
        else:
            writer(results, out)
            if args.format == "junit":
                summary_stream = sys.stderr  # keep the XML on stdout well-formed
        summary_stream.write(summary.line() + "\n")
        summary_stream.flush()
    return EXIT_OK if summary.ok else EXIT_FAILED


@contextlib.contextmanager
def report_stream() -> Iterator[TextIO]:
    """The real stdout for the report, while file descriptor 1 points at stderr.

    Components run in-process may log to stdout; sending that to stderr keeps TAP,
    JUnit XML and the exec protocol on stdout clean.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    out = os.fdopen(os.dup(saved), "w", encoding="utf-8", closefd=True)
    os.dup2(2, 1)
    try:
        yield out
    finally:
        out.flush()
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        out.close()


def cmd_list(args: argparse.Namespace) -> int:
    suite = _load(args)
    cases = suite.select(args.select)
    for case in cases:
        needs = f" needs={','.join(case.needs)}" if case.needs else ""
        level = suite.requirements[case.requirement].level
        sys.stdout.write(f"{case.id}\t{case.requirement} {level}\t{case.op}{needs}\n")
    sys.stdout.write(f"{len(cases)} cases\n")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    root = args.suite or default_suite_dir()
    try:
        suite, problems = Suite.read(root)
    except SuiteError as exc:
        problems = list(exc.problems)
        suite = None
    for problem in problems:
        sys.stdout.write(f"problem: {problem}\n")
    if problems:
        sys.stdout.write(f"suite {root}: {len(problems)} problems\n")
        return EXIT_FAILED
    assert suite is not None
    musts = sum(1 for r in suite.requirements.values() if r.level == "MUST")
    sys.stdout.write(
        f"suite {suite.root}: {len(suite.cases)} cases, {len(suite.requirements)} requirements "
        f"({musts} MUST), all covered; ok\n"
    )
    return EXIT_OK


COMMANDS = {"run": cmd_run, "list": cmd_list, "check": cmd_check}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except SuiteError as exc:
        for problem in exc.problems:
            sys.stderr.write(f"mepconf: suite problem: {problem}\n")
        return EXIT_FAILED
    except (AdapterError, ValueError, OSError) as exc:
        sys.stderr.write(f"mepconf: {exc}\n")
        return EXIT_USAGE
