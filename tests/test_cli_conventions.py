"""The command line's habits (issue 21, item 2), as an administrator meets them.

``mepd --version``; the default settings file (``$MEPD_CONFIG``, else
``/etc/mep/mepd.yaml``) for every command whose ``--config`` was required; ``--json`` on
``check``, ``policy test``, ``status`` and ``map`` (one JSON document on stdout, failures
included, same exit status); no traceback when the reader of a pipe goes away; every file
error names its file; ``mepd map --config`` takes the endpoint's mapping and the account
rules from the settings.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mepd import __version__
from mepd.cli import DEFAULT_CONFIG, build_parser
from tests.trusted_dir import trusted_directory

REPO = Path(__file__).resolve().parents[1]


def mepd(
    *args: str, env: dict[str, str] | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mepd", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        input=stdin,
        cwd=str(REPO),
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def site() -> Iterator[Path]:
    """``mepd init``'s files in a directory the file-trust check accepts; the settings."""
    with trusted_directory("mept-cli-") as top:
        done = mepd("init", str(top / "etc"), "--state-dir", str(top / "state"))
        assert done.returncode == 0, done.stderr
        yield top / "etc" / "mepd.yaml"


def test_version() -> None:
    done = mepd("--version")
    assert done.returncode == 0 and done.stdout == f"mepd {__version__}\n"


# -- the default settings file -------------------------------------------------------------

DEFAULTED = [
    ["check"],
    ["serve"],
    ["status"],
    ["reload"],
    ["functions", "list"],
    ["token", "issue", "--identity", "a@example.org"],
]


@pytest.mark.parametrize("command", DEFAULTED, ids=lambda c: " ".join(c[:2]))
def test_a_command_that_needs_settings_uses_the_default_file(command: list[str]) -> None:
    args = build_parser().parse_args(command)
    # argparse leaves it unset; main() fills in $MEPD_CONFIG or the default.
    assert args.config is None and args._config_default is True
    missing = "/nonexistent/mep/settings.yaml"
    done = mepd(*command, env={"MEPD_CONFIG": missing})
    assert done.returncode == 2
    assert missing in done.stderr and "Traceback" not in done.stderr


def test_without_the_variable_the_default_path_is_used() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MEPD_CONFIG"}
    done = subprocess.run(
        [sys.executable, "-m", "mepd", "check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    if Path(DEFAULT_CONFIG).exists():
        pytest.skip(f"{DEFAULT_CONFIG} exists on this machine")
    assert done.returncode == 2 and DEFAULT_CONFIG in done.stderr


def test_the_variable_and_the_option_both_work(site: Path) -> None:
    assert mepd("check", env={"MEPD_CONFIG": str(site)}).returncode == 0
    assert mepd("check", "--config", str(site), env={"MEPD_CONFIG": "/nonexistent"}).returncode == 0


def test_policy_keeps_its_own_meaning_of_config() -> None:
    """``policy test`` without ``--config`` runs ./policies, as before: no default."""
    args = build_parser().parse_args(["policy", "test"])
    assert args.config is None and not getattr(args, "_config_default", False)


# -- --json ------------------------------------------------------------------------------


def test_check_json(site: Path, tmp_path: Path) -> None:
    done = mepd("check", "--json", "--config", str(site))
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["valid"] is True and answer["problems"] == []
    assert answer["config"] == str(site)
    broken = mepd("check", "--json", "--config", str(tmp_path / "missing.yaml"))
    assert broken.returncode == 2
    answer = json.loads(broken.stdout)
    assert answer["valid"] is False and str(tmp_path / "missing.yaml") in answer["problems"][0]


def test_policy_test_json(site: Path) -> None:
    done = mepd("policy", "test", "--json", "--coverage", "--config", str(site))
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["failed"] == 0 and answer["passed"] == len(answer["cases"]) > 0
    case = answer["cases"][0]
    assert set(case) == {"case", "ok", "decision", "reason", "problems"}
    assert answer["coverage"]["lines"] >= answer["coverage"]["touched"] > 0
    failing = mepd("policy", "test", "--json", "/nonexistent/tables.yaml")
    assert (
        failing.returncode == 2
        and "/nonexistent/tables.yaml" in json.loads(failing.stdout)["error"]
    )


def test_status_json_when_the_daemon_is_not_running(site: Path) -> None:
    done = mepd("status", "--json", "--config", str(site))
    assert done.returncode == 2
    answer = json.loads(done.stdout)
    assert answer["ok"] is False
    # The socket it tried is named.
    assert str(site.parent.parent / "state" / "admin.sock") in answer["error"]


def test_map_json_carries_the_detail_and_usage_errors(site: Path) -> None:
    identity = json.dumps({"id": "1", "username": "root@example.org"})
    done = mepd("map", "--json", "--config", str(site), stdin=identity)
    assert done.returncode == 1
    answer = json.loads(done.stdout)
    assert answer["error"] == "identity.account_root" and "uid 0" in answer["detail"]
    usage = mepd("map", "--json", "--mapping-config", "/nonexistent/m.json", stdin=identity)
    assert usage.returncode == 2
    assert json.loads(usage.stdout) == {
        "error": "usage",
        "detail": json.loads(usage.stdout)["detail"],
    }
    assert "/nonexistent/m.json" in json.loads(usage.stdout)["detail"]


# -- mepd map --config ---------------------------------------------------------------------


def _settings_with(site: Path, tmp: Path, **changes: Any) -> Path:
    import yaml

    data = yaml.safe_load(site.read_text())
    data.update(changes)
    data["endpoints"][0]["mapping"] = str(site.parent / "mapping.json")
    for key in ("policy_model", "template", "schema", "environment", "policy_tests"):
        data["endpoints"][0][key] = str(site.parent / data["endpoints"][0][key])
    data["endpoints"][0]["policy"] = [str(site.parent / p) for p in data["endpoints"][0]["policy"]]
    path = tmp / "settings.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_map_reads_the_account_rules_from_the_settings(site: Path, tmp_path: Path) -> None:
    me = pwd.getpwuid(os.getuid()).pw_name
    identity = json.dumps({"id": "1", "username": f"{me}@example.org"})
    # min_uid above every uid: the settings' rule refuses the account.
    strict = _settings_with(site, tmp_path, min_uid=4_000_000_000)
    done = mepd("map", "--config", str(strict), stdin=identity)
    assert done.returncode == 1, done.stderr
    assert json.loads(done.stdout)["error"] in (
        "identity.account_uid_too_low",
        "identity.account_root",
    )
    # deny_accounts of the settings.
    denied = _settings_with(site, tmp_path, min_uid=1, deny_accounts=[me])
    done = mepd("map", "--config", str(denied), stdin=identity)
    assert json.loads(done.stdout)["error"] in ("identity.account_denied", "identity.account_root")
    # Flags of the other source are refused rather than silently ignored.
    both = mepd("map", "--config", str(site), "--min-uid", "5", stdin=identity)
    assert both.returncode == 2 and "--min-uid" in both.stderr


def test_map_with_several_endpoints_wants_one(site: Path, tmp_path: Path) -> None:
    import yaml

    path = _settings_with(site, tmp_path)
    data = yaml.safe_load(path.read_text())
    data["endpoints"].append({**data["endpoints"][0], "name": "other"})
    path.write_text(yaml.safe_dump(data))
    identity = json.dumps({"id": "1", "username": "alice@example.org"})
    done = mepd("map", "--config", str(path), stdin=identity)
    assert done.returncode == 2 and "--endpoint" in done.stderr
    chosen = mepd(
        "map", "--config", str(path), "--endpoint", "other", "--no-account-check", stdin=identity
    )
    assert chosen.returncode == 0 and json.loads(chosen.stdout)["username"] == "alice"


# -- pipes and file errors -------------------------------------------------------------------


def test_a_closed_pipe_is_no_traceback() -> None:
    """``mepd policy test policies ... | head -n 1``: the reader leaves after one line,
    long before mepd has written its ~160 KB (more than a pipe holds)."""
    tables = " ".join(["policies"] * 30)
    script = (
        f"{sys.executable} -m mepd policy test {tables} | head -n 1; "
        'echo "status=${PIPESTATUS[0]}"'
    )
    done = subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=str(REPO),
    )
    first, status = done.stdout.splitlines()
    assert first.startswith("ok ")
    assert status == f"status={128 + signal.SIGPIPE}", done.stderr
    assert done.stderr == "", done.stderr


def _bad_settings(top: Path) -> Path:
    path = top / "bad.yaml"
    path.write_text(
        "state_dir: /var/lib/mep-nonexistent-state\n"
        "tls: {cert: /nonexistent/tls/cert.pem, key: /nonexistent/tls/key.pem}\n"
        "endpoints:\n"
        "  - name: e\n"
        "    template: /nonexistent/endpoint/template.j2\n"
        "    mapping: /nonexistent/endpoint/mapping.json\n"
        "    policy_model: /nonexistent/endpoint/model.conf\n"
        "    policy: /nonexistent/endpoint/policy.csv\n"
    )
    path.chmod(0o644)
    return path


def test_every_file_error_names_its_file() -> None:
    with trusted_directory("mept-files-") as top:
        bad = _bad_settings(top)
        checked = mepd("check", "--config", str(bad))
        for name in (
            "/nonexistent/tls/cert.pem",
            "/nonexistent/endpoint/mapping.json",
            "/nonexistent/endpoint/model.conf",
            "/nonexistent/endpoint/template.j2",
        ):
            assert name in checked.stderr, checked.stderr
        cases = {
            "/nonexistent/settings.yaml": ["serve", "--config", "/nonexistent/settings.yaml"],
            "/nonexistent/m.json": ["map", "--mapping-config", "/nonexistent/m.json"],
            "/nonexistent/tables.yaml": ["policy", "test", "/nonexistent/tables.yaml"],
            "/nonexistent/p.csv": [
                "policy", "explain", "--policy", "/nonexistent/p.csv",
                "--request", '{"principals": ["user:a"], "endpoint": "e", "obj": "endpoint", "action": "admin"}',
            ],
            "/nonexistent/t.j2": ["render", "--template", "/nonexistent/t.j2"],
            "/nonexistent/state/admin.sock": ["status", "--state-dir", "/nonexistent/state"],
        }  # fmt: skip
        for name, command in cases.items():
            done = mepd(*command, stdin="{}")
            assert done.returncode == 2, (command, done.stderr)
            assert name in done.stderr, (command, done.stderr)
            assert "Traceback" not in done.stderr
