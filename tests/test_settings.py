"""Daemon settings: schema validation with errors that name the key, paths, defaults."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mepcore.errors import SiteConfigError
from mepd.settings import Settings
from tests.daemon_harness import EXAMPLE, REPO
from tests.trusted_dir import make_trusted, trusted_directory

MINIMAL: dict[str, Any] = {
    "state_dir": "state",
    "endpoints": [
        {
            "name": "hpc",
            "template": "t.j2",
            "mapping": "m.json",
            "policy_model": "model.conf",
            "policy": "p.csv",
        }
    ],
}


@pytest.fixture
def trusted_tmp() -> Iterator[Path]:
    """Like ``tmp_path``, where mepd's file-trust check accepts files (not under /tmp)."""
    with trusted_directory("mept-settings-") as path:
        yield path


def absolute_example_endpoint(endpoint: dict[str, Any]) -> None:
    """The example endpoint's file paths (one or a list) made absolute, in place."""
    for key, value in endpoint.items():
        if isinstance(value, str) and (EXAMPLE / value).exists():
            endpoint[key] = str((EXAMPLE / value).resolve())
        elif isinstance(value, list) and value and all((EXAMPLE / v).exists() for v in value):
            endpoint[key] = [str((EXAMPLE / v).resolve()) for v in value]


def violations_of(data: object) -> dict[str, str]:
    with pytest.raises(SiteConfigError) as info:
        Settings.from_mapping(data, base_dir=Path("/etc/mepd"))
    assert info.value.reason == "settings.invalid"
    return {v.path: v.message for v in info.value.violations}


def test_minimal_settings_get_defaults_and_resolved_paths() -> None:
    s = Settings.from_mapping(MINIMAL, base_dir=Path("/etc/mepd"))
    assert s.state_dir == Path("/etc/mepd/state")
    assert s.endpoints[0].template == Path("/etc/mepd/t.j2")
    assert s.audit_path == Path("/etc/mepd/state/audit.jsonl")
    assert (s.host, s.min_uid, s.python) == ("127.0.0.1", 1000, sys.executable)
    assert [i.type for i in s.issuers] == ["local"]
    assert s.endpoints[0].allowed_functions is None


def test_every_violation_is_reported_with_its_key() -> None:
    bad = {
        **MINIMAL,
        "listen": {"port": 70000},
        "limits": {"max_body_bytes": 0, "bogus": 1},
        "issuers": [
            {
                "type": "jwt",
                "issuer": "https://idp",
                "audience": "a",
                "algorithms": ["HS256", "none"],
                # At most one of them (neither: discovery from the issuer).
                "jwks_file": "jwks.json",
                "jwks_url": "https://idp/jwks",
            }
        ],
        "min_uid": 0,
    }
    found = violations_of(bad)
    for key in (
        "$.listen.port",
        "$.limits.max_body_bytes",
        "$.limits",
        "$.issuers[0].algorithms[0]",
        "$.issuers[0].algorithms[1]",
        "$.issuers[0]",
        "$.min_uid",
    ):
        assert key in found, (key, found)


def test_endpoints_are_required_and_names_unique() -> None:
    assert "$" in violations_of({"state_dir": "x"})
    dup = {**MINIMAL, "endpoints": MINIMAL["endpoints"] * 2}
    assert "$.endpoints[1].name" in violations_of(dup)
    assert "$.endpoints[0].name" in violations_of(
        {**MINIMAL, "endpoints": [{**MINIMAL["endpoints"][0], "name": "../x"}]}
    )


def test_duplicate_yaml_keys_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "mepd.yaml"
    path.write_text("state_dir: a\nstate_dir: b\nendpoints: []\n")
    with pytest.raises(SiteConfigError, match="duplicate key"):
        Settings.from_file(path)


def test_policy_is_one_file_or_a_list_merged_in_order() -> None:
    one = Settings.from_mapping(MINIMAL, base_dir=Path("/etc/mepd")).endpoints[0]
    assert one.policy == (Path("/etc/mepd/p.csv"),)
    assert one.policy_tests == ()
    assert one.template_name == "default"
    ep = {
        **MINIMAL["endpoints"][0],
        "policy": ["/etc/mep/base.csv", "site.csv"],
        "policy_tests": "t.yaml",
        "template_name": "gpu",
    }
    many = Settings.from_mapping({**MINIMAL, "endpoints": [ep]}, base_dir=Path("/etc/mepd"))
    endpoint = many.endpoints[0]
    assert endpoint.policy == (Path("/etc/mep/base.csv"), Path("/etc/mepd/site.csv"))
    assert endpoint.policy_tests == (Path("/etc/mepd/t.yaml"),)
    assert endpoint.template_name == "gpu"
    for bad in ([], [""], "", 3):
        found = violations_of({**MINIMAL, "endpoints": [{**ep, "policy": bad}]})
        assert "$.endpoints[0].policy" in found, (bad, found)
    # The policy sees template:<template_name>: one segment, no ':' or spaces.
    for bad_name in ("a:b", "", "a b"):
        found = violations_of({**MINIMAL, "endpoints": [{**ep, "template_name": bad_name}]})
        assert "$.endpoints[0].template_name" in found


def test_allowed_functions_must_be_sha256() -> None:
    ep = {**MINIMAL["endpoints"][0], "allowed_functions": ["abc"]}
    assert "$.endpoints[0].allowed_functions[0]" in violations_of({**MINIMAL, "endpoints": [ep]})


def test_the_example_settings_are_valid_and_mepd_check_accepts_them(trusted_tmp: Path) -> None:
    tmp_path = trusted_tmp
    settings = Settings.from_file(EXAMPLE / "mepd.yaml")
    assert settings.endpoints[0].policy_tests
    assert len(settings.endpoints[0].policy) == 2  # base.csv, then the site's lines
    # The example's state and audit paths are a real install's (/var/lib, /var/log): a
    # test does not write there, and a non-root run could not. Everything else is as is.
    data = yaml.safe_load((EXAMPLE / "mepd.yaml").read_text())
    for endpoint in data["endpoints"]:
        absolute_example_endpoint(endpoint)
    data["state_dir"] = str(tmp_path / "state")
    data["audit_log"] = str(tmp_path / "state" / "audit.jsonl")
    path = tmp_path / "mepd.yaml"
    path.write_text(yaml.safe_dump(data))
    make_trusted(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "mepd", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr


def test_mepd_check_lists_every_problem(tmp_path: Path) -> None:
    data = yaml.safe_load((EXAMPLE / "mepd.yaml").read_text())
    absolute_example_endpoint(data["endpoints"][0])
    (tmp_path / "mapping.json").write_text('[{"DATA_TYPE": "nope"}]')
    (tmp_path / "policy.csv").write_text("p, only, three\n")
    data["endpoints"][0]["mapping"] = str(tmp_path / "mapping.json")
    data["endpoints"][0]["policy"] = str(tmp_path / "policy.csv")
    data["python"] = str(tmp_path / "no-python")
    data["state_dir"] = str(tmp_path / "state")
    path = tmp_path / "mepd.yaml"
    path.write_text(yaml.safe_dump(data))
    out = subprocess.run(
        [sys.executable, "-m", "mepd", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 2
    lines = out.stderr.splitlines()
    assert any("mapping" in line for line in lines), out.stderr
    assert any("policy" in line and "policy_tests" not in line for line in lines), out.stderr
    assert any("python" in line for line in lines), out.stderr


def test_mepd_check_reports_schema_errors_by_key(tmp_path: Path) -> None:
    path = tmp_path / "mepd.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "limits": {"max_body_bytes": -5}}))
    out = subprocess.run(
        [sys.executable, "-m", "mepd", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 2
    assert "$.limits.max_body_bytes" in out.stderr


def check_with_table(tmp_path: Path, table: Any) -> subprocess.CompletedProcess[str]:
    """``mepd check`` of the example with ``table`` as the endpoint's policy_tests;
    ``tmp_path`` must be a trusted directory."""
    data = yaml.safe_load((EXAMPLE / "mepd.yaml").read_text())
    ep = data["endpoints"][0]
    absolute_example_endpoint(ep)
    (tmp_path / "table.yaml").write_text(yaml.safe_dump(table))
    ep["policy_tests"] = str(tmp_path / "table.yaml")
    data["state_dir"] = str(tmp_path / "state")
    path = tmp_path / "mepd.yaml"
    path.write_text(yaml.safe_dump(data))
    make_trusted(tmp_path)
    return subprocess.run(
        [sys.executable, "-m", "mepd", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


ADMIN_WITHOUT_MFA = {
    "name": "operator without mfa",
    "request": {
        "obj": "endpoint",
        "action": "admin",
        "principals": ["username:operator@example.org"],
    },
    "expect": "allow",
}


def test_failing_decision_table_is_a_problem(trusted_tmp: Path) -> None:
    out = check_with_table(trusted_tmp, {"cases": [ADMIN_WITHOUT_MFA]})
    assert out.returncode == 2
    assert "operator without mfa: expected allow, got deny" in out.stderr


def test_an_endpoint_table_is_decided_with_the_endpoint_policy_list(trusted_tmp: Path) -> None:
    """A table naming a policy of its own is still decided with the endpoint's files
    (base.csv + policy.csv): root is refused by base.csv, the operator allowed by
    policy.csv; the request's endpoint defaults to the endpoint's name."""
    (trusted_tmp / "allow-all.csv").write_text("p, **, *, **, *, -, allow\n")
    cases = [
        {
            "name": "root",
            "request": {"obj": "user:root", "action": "map_identity", "principals": ["user:root"]},
            "expect": "deny",
            "reason": "authz.explicit_deny",
            "line": "base.csv:7",
        },
        {**ADMIN_WITHOUT_MFA, "request": {**ADMIN_WITHOUT_MFA["request"], "mfa": True}},
    ]
    out = check_with_table(trusted_tmp, {"policy": "allow-all.csv", "cases": cases})
    assert out.returncode == 0, out.stderr


def test_the_old_list_format_of_policy_tests_is_refused_with_the_file_named(
    trusted_tmp: Path,
) -> None:
    out = check_with_table(trusted_tmp, [ADMIN_WITHOUT_MFA])
    assert out.returncode == 2
    assert "policy_tests" in out.stderr and "table.yaml" in out.stderr
    assert "is not of type 'object'" in out.stderr


def test_retention_bounds_per_user_have_defaults_and_must_be_positive_integers() -> None:
    limits = Settings.from_mapping(MINIMAL, base_dir=Path("/etc/mepd")).limits
    assert limits.retained_tasks_per_user == 1_000_000
    assert limits.retained_result_bytes_per_user == 4 * 1024**3
    given = {"retained_tasks_per_user": 10, "retained_result_bytes_per_user": 2048}
    limits = Settings.from_mapping({**MINIMAL, "limits": given}, base_dir=Path("/etc")).limits
    assert (limits.retained_tasks_per_user, limits.retained_result_bytes_per_user) == (10, 2048)
    for name in given:
        for bad in (0, -1, 1.5, "10"):
            assert f"$.limits.{name}" in violations_of({**MINIMAL, "limits": {name: bad}})
