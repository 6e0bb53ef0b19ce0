"""``mepd policy test|explain`` and the shipped policies' decision tables."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def mepd(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mepd", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_shipped_policies_pass_their_decision_tables_with_full_coverage() -> None:
    result = mepd("policy", "test", "--coverage", "policies/")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    summary = re.fullmatch(r"(\d+) passed, 0 failed", lines[-1])
    assert summary and int(summary.group(1)) >= 40
    assert re.search(r"coverage: (\d+) of \1 policy lines touched; 0 untouched", result.stdout)
    assert sum(1 for line in lines if line.startswith("ok   ")) == int(summary.group(1))


def write_table(tmp_path: Path, expect: str, extra: str = "") -> Path:
    (tmp_path / "p.csv").write_text(
        "p, id:a, hpc, endpoint, read_status, -, allow\np, id:z, hpc, endpoint, admin, -, allow\n"
    )
    table = tmp_path / "t.yaml"
    table.write_text(
        "policy: p.csv\n"
        "cases:\n"
        "  - name: a reads\n"
        "    request: {endpoint: hpc, obj: endpoint, action: read_status, principals: ['id:a']}\n"
        f"    expect: {expect}\n" + extra
    )
    return table


def test_a_failing_case_fails_the_run(tmp_path: Path) -> None:
    table = write_table(tmp_path, "deny")
    result = mepd("policy", "test", str(table))
    assert result.returncode == 1
    assert "FAIL" in result.stdout and "expected deny, got allow" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "0 passed, 1 failed"


def test_coverage_lists_untouched_lines(tmp_path: Path) -> None:
    table = write_table(tmp_path, "allow", "    line: 1\n")
    result = mepd("policy", "test", "--coverage", str(table))
    assert result.returncode == 0
    assert (
        "untouched" in result.stdout and "p.csv:2: p, id:z, hpc, endpoint, admin" in result.stdout
    )
    assert result.stdout.strip().splitlines()[-1] == "1 passed, 0 failed"


def test_wrong_responsible_line_fails(tmp_path: Path) -> None:
    table = write_table(tmp_path, "allow", "    line: p.csv:2\n")
    result = mepd("policy", "test", str(table))
    assert result.returncode == 1
    assert "expected line p.csv:2" in result.stdout


def test_run_selects_cases(tmp_path: Path) -> None:
    table = write_table(tmp_path, "deny")
    result = mepd("policy", "test", "--run", "no such case", str(table))
    assert result.stdout.strip().splitlines()[-1] == "0 passed, 0 failed"
    assert result.returncode == 1  # nothing ran is not a pass


@pytest.mark.parametrize(
    "content",
    [
        "policy: p.csv\ncases: []\n",
        "policy: p.csv\npolicy: p.csv\ncases: [{name: x, request: {}, expect: allow}]\n",
        "policy: missing.csv\ncases: [{name: x, request: {endpoint: e, obj: o, action: admin}, expect: allow}]\n",
        "policy: p.csv\ncases: [{name: x, request: {endpoint: e}, expect: allow}]\n",
    ],
)
def test_broken_tables_are_usage_errors(tmp_path: Path, content: str) -> None:
    (tmp_path / "p.csv").write_text("p, id:a, hpc, endpoint, read_status, -, allow\n")
    (tmp_path / "t.yaml").write_text(content)
    result = mepd("policy", "test", str(tmp_path / "t.yaml"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("mepd policy: ")


def test_broken_policy_is_reported_with_its_line(tmp_path: Path) -> None:
    table = write_table(tmp_path, "allow")
    (tmp_path / "p.csv").write_text("p, id:a, hpc, endpoint, read_status, -, allow\np, x, y\n")
    result = mepd("policy", "test", str(table))
    assert result.returncode == 2
    assert "p.csv:2" in result.stderr


def test_explain_prints_the_decision_as_json() -> None:
    request = {
        "endpoint": "hpc",
        "obj": "template:gpu",
        "action": "start_endpoint",
        "principals": ["group:gpu-users"],
        "mfa": False,
        "auth_age": 10,
    }
    result = mepd(
        "policy",
        "explain",
        "--model",
        "policies/model.conf",
        "--policy",
        "policies/examples/gpu-template.csv",
        "--request",
        json.dumps(request),
    )
    assert result.returncode == 1
    out = json.loads(result.stdout)
    assert out["allowed"] is False
    assert out["reason"] == "authz.condition_failed"
    assert [line["line"] for line in out["lines"]] == [4]
    assert out["policy_version"].startswith("sha256:")

    request["mfa"] = True
    result = mepd(
        "policy",
        "explain",
        "--policy",
        "policies/examples/gpu-template.csv",
        "--request",
        json.dumps(request),
    )
    assert result.returncode == 0
    assert json.loads(result.stdout)["reason"] == "authz.allowed"


def test_explain_uses_now_for_hours_and_merges_the_policy_files_in_order() -> None:
    request = json.dumps(
        {
            "endpoint": "hpc",
            "obj": "template:default",
            "action": "start_endpoint",
            "principals": ["domain:campus.edu", "user:alice"],
            "uid": 1001,
        }
    )
    args = [
        "policy",
        "explain",
        "--policy",
        "policies/base.csv",
        "--policy",
        "policies/examples/maintenance-window.csv",
        "--request",
        request,
    ]
    night = mepd(*args, "--now", "2024-05-01T03:00:00Z")
    assert night.returncode == 1
    assert json.loads(night.stdout)["lines"][0]["source"].endswith("maintenance-window.csv")
    day = mepd(*args, "--now", "2024-05-01T13:00:00Z")
    assert day.returncode == 0
    assert json.loads(day.stdout)["lines"][0]["source"].endswith("base.csv")


def test_an_endpoint_tables_run_with_its_policy_list_from_the_settings() -> None:
    """examples/daemon's table names no policy: --config decides it with base.csv and
    policy.csv, as mepd.yaml lists them; run alone, it is a usage error."""
    result = mepd("policy", "test", "--config", "examples/daemon/mepd.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.fullmatch(r"[1-9]\d* passed, 0 failed", result.stdout.splitlines()[-1])
    alone = mepd("policy", "test", "examples/daemon/policy_tests.yaml")
    assert alone.returncode == 2
    assert "names no policy" in alone.stderr
    listed = mepd(
        "policy",
        "test",
        "--policy",
        "policies/base.csv",
        "--policy",
        "examples/daemon/policy.csv",
        "--run",
        "root",
        "examples/daemon/policy_tests.yaml",
    )
    # Without --config the requests name no endpoint: a broken table, said so.
    assert listed.returncode == 2 and "endpoint" in listed.stderr


def test_explain_takes_an_endpoint_policy_list_from_the_settings() -> None:
    request = {"obj": "user:alice", "action": "read_status", "principals": ["user:alice"]}
    args = ["policy", "explain", "--config", "examples/daemon/mepd.yaml"]
    result = mepd(*args, "--request", json.dumps({**request, "uid": 1001}))
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["request"]["endpoint"] == "hpc"
    assert out["lines"][0]["source"].endswith("policies/base.csv")
    assert mepd(*args, "--endpoint", "nope", "--request", json.dumps(request)).returncode == 2
    both = mepd(*args, "--policy", "policies/base.csv", "--request", json.dumps(request))
    assert both.returncode == 2
