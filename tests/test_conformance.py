"""The conformance suite and its runner (``python -m mepconf``).

The whole suite runs in-process and must pass; deliberately broken deployments
(``--broken`` variants of the in-process adapter, and the same through the exec
harness) must make exactly the relevant cases fail; the suite checks itself.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from mepconf.compare import compare
from mepconf.runner import ExpectedFailures
from mepconf.suite import Suite

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "conformance"
SUMMARY = re.compile(
    r"^(?P<passed>\d+) passed, (?P<failed>\d+) failed, (?P<skipped>\d+) skipped, "
    r"(?P<errors>\d+) errors(?:, (?P<xfailed>\d+) expected failures)?"
    r"(?:, (?P<xpassed>\d+) unexpected passes)?$"
)
HARNESS = f"{sys.executable} -m mepconf.harness"


def mepconf(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mepconf", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )


def summary_of(out: str) -> dict[str, int]:
    last = out.rstrip("\n").splitlines()[-1]
    found = SUMMARY.match(last)
    assert found, f"no summary line at the end: {last!r}"
    return {k: int(v or 0) for k, v in found.groupdict().items()}


def verdicts(out: str) -> dict[str, str]:
    """case id -> verdict, from the text report."""
    table = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in {"PASS", "FAIL", "SKIP", "ERROR", "XFAIL", "XPASS"}:
            table[parts[1]] = parts[0]
    return table


# -- the suite itself -------------------------------------------------------------------


def test_check_passes() -> None:
    done = mepconf("check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all covered; ok" in done.stdout


def test_suite_shape() -> None:
    suite = Suite.load(SUITE)
    assert len(suite.cases) >= 200
    areas = {c.id.split("/")[0] for c in suite.cases}
    assert {"identity", "authz", "config", "uep", "task", "api", "durability"} <= areas
    musts = {r for r, req in suite.requirements.items() if req.level == "MUST"}
    assert musts <= {c.requirement for c in suite.cases}


def test_adapters_never_see_the_expectation() -> None:
    case = Suite.load(SUITE).cases[0]
    assert "expect" not in case.to_wire()
    assert "description" not in case.to_wire()


@pytest.mark.parametrize(
    ("mutate", "problem"),
    [
        (lambda d: d["cases"].append(dict(d["cases"][0])), "duplicate case id"),
        (lambda d: d["cases"][0].update(requirement="MEP-ID-999"), "unknown requirement"),
        (lambda d: d["cases"][0].update(given={"x": {"$fixture": "nope.json"}}), "does not exist"),
        (
            lambda d: d["cases"][0].update(given={"x": {"$fixture": "../requirements.json"}}),
            "leaves the fixtures folder",
        ),
        (lambda d: d["cases"][0].pop("expect"), "'expect' is a required property"),
        (lambda d: d["cases"][0].update(id="authz/other/001"), "must start with"),
        (lambda d: d["cases"][0].update(expect={"error": "Not A Code"}), "$.cases[0].expect"),
    ],
)
def test_check_finds_broken_cases(tmp_path: Path, mutate, problem: str) -> None:  # type: ignore[no-untyped-def]
    suite = tmp_path / "suite"
    shutil.copytree(SUITE, suite)
    path = suite / "cases" / "identity" / "no_mapping.json"
    doc = json.loads(path.read_text())
    mutate(doc)
    path.write_text(json.dumps(doc))
    done = mepconf("--suite", str(suite), "check")
    assert done.returncode == 1
    assert problem in done.stdout, done.stdout


def test_check_finds_an_uncovered_must(tmp_path: Path) -> None:
    suite = tmp_path / "suite"
    shutil.copytree(SUITE, suite)
    reqs = json.loads((suite / "requirements.json").read_text())
    reqs["requirements"].append(
        {"id": "MEP-ID-099", "level": "MUST", "area": "identity", "text": "Something."}
    )
    (suite / "requirements.json").write_text(json.dumps(reqs))
    done = mepconf("--suite", str(suite), "check")
    assert done.returncode == 1
    assert "MUST requirement MEP-ID-099 has no case" in done.stdout


def test_list_selects_by_prefix_and_requirement() -> None:
    done = mepconf("list", "--select", "identity/whole_string/00", "--select", "MEP-AZ-002")
    assert done.returncode == 0
    ids = [line.split("\t")[0] for line in done.stdout.splitlines()[:-1]]
    assert ids
    assert all(i.startswith("identity/whole_string/00") or i.startswith("authz/") for i in ids)
    assert done.stdout.splitlines()[-1] == f"{len(ids)} cases"


# -- the whole suite in-process -------------------------------------------------------


def test_whole_suite_passes_in_process() -> None:
    done = mepconf("run", "--adapter", "inprocess")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    counts = summary_of(done.stdout)
    assert counts["failed"] == 0
    assert counts["errors"] == 0
    assert counts["passed"] >= 450
    table = verdicts(done.stdout)
    # Cases needing a live daemon are skipped with their reason, never passed.
    assert all(v == "SKIP" for k, v in table.items() if k.startswith(("api/", "durability/")))
    assert "op api.request is not supported by the inprocess adapter" in done.stdout


# -- deliberately broken deployments ------------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "select", "must_fail", "must_pass"),
    [
        (
            "prefix-match",
            "identity/",
            [
                "identity/whole_string/002",  # alice@example.org.evil.com
                "identity/whole_string/003",  # trailing newline
                "identity/whole_string/018",  # alicex against alice|bob
                "identity/resolve/011",
            ],
            ["identity/whole_string/001", "identity/accounts/004"],
        ),
        (
            "permissive-authz",
            "authz/",
            ["authz/decisions/001", "authz/decisions/018", "authz/decisions/070"],
            ["authz/decisions/012"],
        ),
        (
            "no-account-check",
            "identity/",
            ["identity/accounts/004", "identity/accounts/007", "identity/resolve/002"],
            ["identity/accounts/001", "identity/whole_string/002"],
        ),
    ],
)
def test_a_broken_deployment_fails_the_relevant_cases(
    variant: str, select: str, must_fail: list[str], must_pass: list[str]
) -> None:
    done = mepconf("run", "--adapter", "inprocess", "--broken", variant, "--select", select)
    assert done.returncode == 1
    counts = summary_of(done.stdout)
    assert counts["failed"] > 0
    table = verdicts(done.stdout)
    for case_id in must_fail:
        assert table[case_id] == "FAIL", case_id
    for case_id in must_pass:
        assert table[case_id] == "PASS", case_id


def test_the_prefix_match_variant_fails_only_identity_cases() -> None:
    done = mepconf("run", "--adapter", "inprocess", "--broken", "prefix-match")
    failed = {k for k, v in verdicts(done.stdout).items() if v == "FAIL"}
    assert failed
    assert all(k.startswith("identity/") for k in failed)


# -- expected failures ----------------------------------------------------------------


def test_a_deployment_passes_its_own_expected_failures(tmp_path: Path) -> None:
    broken = mepconf(
        "run", "--adapter", "inprocess", "--broken", "prefix-match", "--select", "identity/"
    )
    failed = sorted(k for k, v in verdicts(broken.stdout).items() if v == "FAIL")
    listing = tmp_path / "xfail.json"
    listing.write_text(
        json.dumps(
            {"expected_failures": [{"id": i, "reason": "site matches prefixes"} for i in failed]}
        )
    )
    done = mepconf(
        "run", "--adapter", "inprocess", "--broken", "prefix-match", "--select", "identity/",
        "--expected-failures", str(listing),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:]
    counts = summary_of(done.stdout)
    assert counts["failed"] == 0
    assert counts["xfailed"] == len(failed)


def test_an_expected_failure_that_passes_is_reported(tmp_path: Path) -> None:
    listing = tmp_path / "xfail.txt"
    listing.write_text(
        "# a case this deployment passes after all\nidentity/whole_string/001 old bug\n"
    )
    done = mepconf(
        "run", "--adapter", "inprocess", "--select", "identity/whole_string/00",
        "--expected-failures", str(listing),
    )  # fmt: skip
    assert done.returncode == 1
    assert verdicts(done.stdout)["identity/whole_string/001"] == "XPASS"
    assert summary_of(done.stdout)["xpassed"] == 1


def test_expected_failures_prefix_patterns(tmp_path: Path) -> None:
    listing = tmp_path / "xfail.txt"
    listing.write_text("identity/whole_string/* known\n")
    table = ExpectedFailures.from_file(listing)
    assert table.lookup("identity/whole_string/012") == "known"
    assert table.lookup("identity/selection/001") is None


# -- skips, reports -------------------------------------------------------------------


def test_cases_needing_missing_properties_are_skipped_not_passed() -> None:
    done = mepconf("run", "--adapter", "inprocess", "--select", "uep/")
    assert done.returncode == 0
    counts = summary_of(done.stdout)
    assert counts["passed"] == 0
    assert counts["skipped"] > 0


def test_tap_report() -> None:
    done = mepconf(
        "run", "--adapter", "inprocess", "--select", "identity/no_mapping/", "--format", "tap"
    )
    lines = done.stdout.splitlines()
    assert lines[0] == "TAP version 13"
    assert lines[1] == "1..5"
    assert sum(1 for line in lines if line.startswith("ok ")) == 5
    assert SUMMARY.match(lines[-1])


def test_tap_marks_skips_and_failures() -> None:
    done = mepconf(
        "run", "--adapter", "inprocess", "--broken", "prefix-match",
        "--select", "identity/whole_string/002", "--select", "api/requests/001", "--format", "tap",
    )  # fmt: skip
    assert "not ok 2 - identity/whole_string/002" in done.stdout
    assert "# SKIP op api.request is not supported" in done.stdout
    assert "  verdict: fail" in done.stdout


def test_junit_report(tmp_path: Path) -> None:
    report = tmp_path / "report.xml"
    done = mepconf(
        "run", "--adapter", "inprocess", "--broken", "permissive-authz", "--select", "authz/requests/",
        "--select", "authz/decisions/00", "--format", "junit", "--output", str(report),
    )  # fmt: skip
    assert done.returncode == 1
    root = ET.parse(report).getroot()
    assert root.tag == "testsuites"
    cases = root.findall(".//testcase")
    counts = summary_of(done.stdout)
    assert len(cases) == counts["passed"] + counts["failed"]
    assert int(root.get("failures", "-1")) == counts["failed"] == len(root.findall(".//failure"))


# -- the exec adapter -----------------------------------------------------------------


def test_exec_adapter_through_the_reference_harness() -> None:
    select = ["--select", "identity/", "--select", "authz/", "--select", "config/"]
    inproc = summary_of(mepconf("run", "--adapter", "inprocess", *select).stdout)
    done = mepconf("run", "--adapter", "exec", "--command", HARNESS, *select)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert summary_of(done.stdout) == inproc


def test_exec_adapter_catches_a_broken_harness() -> None:
    done = mepconf(
        "run", "--adapter", "exec", "--command", f"{HARNESS} --broken prefix-match",
        "--select", "identity/whole_string/",
    )  # fmt: skip
    assert done.returncode == 1
    assert verdicts(done.stdout)["identity/whole_string/002"] == "FAIL"


CHEAT = """
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    if msg["type"] == "hello":
        print(json.dumps({"type": "hello", "protocol": "mepconf-exec/1",
                          "ops": ["identity.map"], "properties": []}), flush=True)
    elif msg["type"] == "case":
        # A harness that claims every identity maps to "alice" and ignores the rules.
        if msg["case"]["id"].endswith("3"):
            print("this is not JSON", flush=True)
        else:
            print(json.dumps({"type": "result", "id": msg["case"]["id"],
                              "result": {"username": "alice"}}), flush=True)
    else:
        break
"""


def test_exec_adapter_with_a_cheating_harness(tmp_path: Path) -> None:
    script = tmp_path / "cheat.py"
    script.write_text(CHEAT)
    done = mepconf(
        "run", "--adapter", "exec", "--command", f"{sys.executable} {script}",
        "--select", "identity/whole_string/00", "--select", "authz/decisions/001",
    )  # fmt: skip
    assert done.returncode == 1
    table = verdicts(done.stdout)
    assert table["identity/whole_string/002"] == "FAIL"  # no mapping expected
    assert table["identity/whole_string/003"] == "ERROR"  # garbage on the protocol
    assert table["identity/whole_string/004"] == "FAIL"  # the harness was restarted
    assert table["authz/decisions/001"] == "SKIP"


def test_exec_adapter_times_out_a_silent_harness(tmp_path: Path) -> None:
    script = tmp_path / "silent.py"
    script.write_text(
        "import json, sys\n"
        "print(json.dumps({'type': 'hello', 'protocol': 'mepconf-exec/1',"
        " 'ops': ['identity.map'], 'properties': []}), flush=True)\n"
        "sys.stdin.readline()\n"
        "sys.stdin.read()\n"
    )
    done = mepconf(
        "run", "--adapter", "exec", "--command", f"{sys.executable} {script}",
        "--option", "timeout=1", "--select", "identity/whole_string/001",
    )  # fmt: skip
    assert done.returncode == 1
    assert "no answer from the harness within 1 s" in done.stdout


# -- comparison semantics -------------------------------------------------------------


def test_compare_subset_and_exact() -> None:
    assert compare({"a": 1}, {"a": 1, "b": 2}) == []
    assert compare({"a": 1}, {"a": 1, "b": 2}, exact=True) != []
    assert compare([1, {"x": 1}], [1, {"x": 1, "y": 2}]) == []
    assert compare([1], [1, 2]) != []
    assert compare(True, 1) != []
    assert compare(1, 1.0) == []
    assert compare("1", 1) != []
    assert compare(None, False) != []


def test_compare_matchers() -> None:
    assert compare({"a": {"$type": "string"}}, {"a": "x"}) == []
    assert compare({"a": {"$type": "string"}}, {"a": 1}) != []
    assert compare({"a": {"$absent": True}}, {"b": 1}) == []
    assert compare({"a": {"$absent": True}}, {"a": None}) != []
    assert compare({"$contains": [2]}, [1, 2, 3]) == []
    assert compare({"$contains": [4]}, [1, 2, 3]) != []
    assert compare({"$contains": [{"path": "$.x"}]}, [{"path": "$.x", "m": 1}]) == []
    assert compare({"$any": True}, None) == []
