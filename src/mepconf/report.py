"""Reporters: plain text, TAP version 13 and JUnit XML.

Each reporter writes the per-case verdicts; the summary line (``N passed, M failed…``)
is written by the command itself so that it is always the last line whatever the
format. In TAP an expected failure is a ``# TODO`` test and a skip a ``# SKIP``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import TextIO

from mepconf.runner import ERROR, FAIL, PASS, SKIP, XFAIL, XPASS, CaseResult, Summary

FORMATS = ("text", "tap", "junit")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def write_text(results: Sequence[CaseResult], out: TextIO) -> None:
    for r in results:
        line = f"{r.status.upper():5} {r.case.id} [{r.case.requirement}]"
        if r.status != PASS and r.message:
            line += f" - {_one_line(r.message)}"
        out.write(line + "\n")


def write_tap(results: Sequence[CaseResult], out: TextIO) -> None:
    out.write("TAP version 13\n")
    out.write(f"1..{len(results)}\n")
    for n, r in enumerate(results, 1):
        ok = "ok" if r.status in (PASS, SKIP, XPASS) else "not ok"
        line = f"{ok} {n} - {r.case.id} [{r.case.requirement}]"
        if r.status == SKIP:
            line += f" # SKIP {_one_line(r.message)}"
        elif r.status == XFAIL:
            line += f" # TODO {_one_line(r.message)}"
        out.write(line + "\n")
        if r.status in (FAIL, ERROR, XPASS):
            out.write("  ---\n")
            out.write(f"  verdict: {r.status}\n")
            out.write(f"  message: {_yaml_quote(_one_line(r.message))}\n")
            out.write(f"  op: {r.case.op}\n")
            out.write("  ...\n")


def _yaml_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_junit(results: Sequence[CaseResult], out: TextIO) -> None:
    summary = Summary.of(results)
    suites = ET.Element("testsuites", name="mep conformance")
    by_area: dict[str, list[CaseResult]] = {}
    for r in results:
        by_area.setdefault(r.case.id.split("/", 1)[0], []).append(r)
    for area, items in by_area.items():
        s = Summary.of(items)
        suite = ET.SubElement(
            suites,
            "testsuite",
            name=area,
            tests=str(len(items)),
            failures=str(s.failed + s.xpassed),
            errors=str(s.errors),
            skipped=str(s.skipped + s.xfailed),
            time=f"{sum(r.seconds for r in items):.6f}",
        )
        for r in items:
            tc = ET.SubElement(
                suite,
                "testcase",
                classname=f"{area}.{r.case.id.split('/')[1]}",
                name=r.case.id,
                time=f"{r.seconds:.6f}",
            )
            ET.SubElement(
                ET.SubElement(tc, "properties"),
                "property",
                name="requirement",
                value=r.case.requirement,
            )
            if r.status == FAIL:
                ET.SubElement(tc, "failure", message=_one_line(r.message)[:500]).text = r.message
            elif r.status == XPASS:
                ET.SubElement(tc, "failure", message="unexpected pass").text = r.message
            elif r.status == ERROR:
                ET.SubElement(tc, "error", message=_one_line(r.message)[:500]).text = r.message
            elif r.status in (SKIP, XFAIL):
                ET.SubElement(tc, "skipped", message=_one_line(r.message)[:500])
    suites.set("tests", str(len(results)))
    suites.set("failures", str(summary.failed + summary.xpassed))
    suites.set("errors", str(summary.errors))
    suites.set("skipped", str(summary.skipped + summary.xfailed))
    ET.indent(suites)
    out.write('<?xml version="1.0" encoding="UTF-8"?>\n')
    out.write(ET.tostring(suites, encoding="unicode"))
    out.write("\n")


WRITERS = {"text": write_text, "tap": write_tap, "junit": write_junit}
