"""``mepd import-globus-compute``: a Globus Compute endpoint's files become a mep deployment.

The first input is what ``globus-compute-endpoint configure --multi-user`` writes
(recorded by tools/record_gc_vectors.py into tests/fixtures/gc/configure_multi_user): its
import passes ``mepd check``, and, as root, a real mepd started from it runs a function
as the account the reference's own example mapping maps to, through the client's
Executor as ``make demo`` does. The second is a fuller endpoint directory (function
allow-list, admins, PAM, audit log, an environment with non-text values, an external
mapper by relative path) whose every key is either carried over or reported.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mepd.commands.check import collect_problems
from tests.trusted_dir import trusted_directory

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "gc"
CONFIGURED = FIXTURES / "configure_multi_user"
ALLOWED = [
    "0b6a3c6e-1111-4222-8333-444455556666",
    "0b6a3c6e-1111-4222-8333-444455557777",
]
ADMIN = "9c7f4a1e-0000-4000-8000-00000000abcd"


def mepd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mepd", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def top() -> Iterator[Path]:
    with trusted_directory("mept-gc-") as path:
        yield path


def configured_endpoint(top: Path) -> Path:
    """The recorded configure --multi-user files, in an endpoint directory of our own."""
    folder = top / "gc" / "gc-mu"
    folder.mkdir(parents=True)
    for source in CONFIGURED.iterdir():
        text = source.read_text().replace("@GC_DIR@", str(folder))
        (folder / source.name).write_text(text)
    return folder


def import_gc(source: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return mepd(
        "import-globus-compute", str(source), "--out", str(out),
        "--state-dir", str(out / "state"), *extra,
    )  # fmt: skip


def test_configure_multi_user_output_imports_and_passes_mepd_check(top: Path) -> None:
    out = top / "mep"
    done = import_gc(configured_endpoint(top), out)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "mepd check passes" in done.stdout
    assert collect_problems(str(out / "mepd.yaml")) == []
    checked = mepd("check", "--config", str(out / "mepd.yaml"))
    assert checked.returncode == 0, checked.stderr
    # The reference's own example mapping is kept as it is, and mepd check says what
    # is likely wrong with it (an unescaped dot; names that can contain '@').
    assert "unescaped" in checked.stderr and "'@'" in checked.stderr
    mapping = json.loads((out / "identity_mapping.json").read_text())
    assert mapping == json.loads((CONFIGURED / "example_identity_mapping_config.json").read_text())
    assert (out / "templates" / "user_config_template.yaml.j2").read_text() == (
        CONFIGURED / "user_config_template.yaml.j2"
    ).read_text()
    settings = yaml.safe_load((out / "mepd.yaml").read_text())
    (endpoint,) = settings["endpoints"]
    assert endpoint["name"] == "gc-mu"
    assert endpoint["schema"] == "templates/user_config_schema.json"
    site = (out / "policy" / "site.csv").read_text()
    assert "p, **, gc-mu, function:*, submit_task, uid_ge:1000, allow" in site
    report = (out / "import-report.txt").read_text()
    assert "config.yaml email" in report and "config.yaml public" in report
    assert "uv virtual environment" in report
    # Modes mepd check's file-trust check asks for; the mapping private as there.
    assert stat.S_IMODE((out / "identity_mapping.json").stat().st_mode) == 0o600
    for path in out.rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert not mode & 0o022, path


def fuller_endpoint(top: Path) -> Path:
    folder = top / "gc" / "hpc-login"
    folder.mkdir(parents=True)
    programs = top / "gc" / "bin"
    programs.mkdir()
    (programs / "mapper.py").write_text("#!/usr/bin/env python3\n")
    (programs / "mapper.py").chmod(0o755)
    (folder / "mapping.json").write_text(
        json.dumps(
            [
                {
                    "DATA_TYPE": "expression_identity_mapping#1.0.0",
                    "mappings": [
                        {"source": "{username}", "match": "(.*)@lab\\.example\\.org",
                         "output": "{0}"},
                    ],
                },
                {"DATA_TYPE": "external_identity_mapping#1.0.0",
                 "command": ["../bin/mapper.py", "--strict"]},
            ]
        )
    )  # fmt: skip
    config = {
        "display_name": "HPC login",
        "email": "hpc@example.org",
        "public": True,
        "identity_mapping_config_path": str(folder / "mapping.json"),
        "audit_log_path": str(top / "audit" / "audit.jsonl"),
        "pam": {},
        "allowed_functions": ALLOWED,
        "admins": [ADMIN],
        "authentication_policy": "11111111-2222-4333-8444-555555555555",
        "amqp_port": 443,
        "debug": True,
        "unexpected": 1,
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "user_config_template.yaml").write_text(
        "{% include 'common.yaml.j2' %}\nengine:\n  type: ThreadPoolEngine\n"
    )
    (folder / "common.yaml.j2").write_text("idle_heartbeats_soft: 2\n")
    (folder / "user_environment.yaml").write_text(
        "SITE: hpc\nDEBUG_LEVEL: 3\nVERBOSE: true\nHOME: /elsewhere\nCWD: /scratch\n"
    )
    return folder


def test_every_key_of_a_fuller_endpoint_is_carried_over_or_reported(top: Path) -> None:
    source = fuller_endpoint(top)
    (top / "audit").mkdir(mode=0o755)
    out = top / "mep"
    done = import_gc(source, out, "--name", "hpc")
    report = (out / "import-report.txt").read_text()
    settings = yaml.safe_load((out / "mepd.yaml").read_text())
    (endpoint,) = settings["endpoints"]
    assert endpoint["name"] == "hpc" and endpoint["display_name"] == "HPC login"
    assert endpoint["template"] == "templates/user_config_template.yaml"
    assert settings["audit_log"] == str(top / "audit" / "audit.jsonl")
    assert settings["log_level"] == "debug"
    # pam: {} is enabled in Globus Compute (its default), with its service name.
    assert settings["pam"] == {"enable": True, "service": "globus-compute-endpoint"}
    assert (out / "templates" / "common.yaml.j2").exists()
    # Function UUIDs cannot be carried over: the allowed set starts empty.
    site = (out / "policy" / "site.csv").read_text()
    assert "p, **, hpc, fset:allowed, submit_task, uid_ge:1000, allow" in site
    assert "function:*" not in site
    assert all(f"# Globus function {u}" in site for u in ALLOWED)
    assert f"g, id:{ADMIN}, role:admin, hpc" in site
    assert "p, role:admin, hpc, endpoint, admin, -, allow" in site
    # The external mapper's relative path now names the same program absolutely.
    mapping = json.loads((out / "identity_mapping.json").read_text())
    assert mapping[1]["command"] == [str(top / "gc" / "bin" / "mapper.py"), "--strict"]
    environment = yaml.safe_load((out / "templates" / "user_environment.yaml").read_text())
    assert environment == {"SITE": "hpc", "DEBUG_LEVEL": "3", "VERBOSE": "True"}
    for key in ("email", "public", "authentication_policy", "amqp_port", "unexpected"):
        assert f"config.yaml {key}:" in report, key
    for fragment in ("allowed_functions (2 Globus", "HOME", "CWD", "/etc/pam.d/"):
        assert fragment in report, fragment
    # PAM's service file does not exist here: the one problem mepd check finds.
    problems = collect_problems(str(out / "mepd.yaml"))
    if os.path.exists("/etc/pam.d/globus-compute-endpoint"):
        assert problems == [] and done.returncode == 0
    else:
        assert done.returncode in (0, 1), done.stderr
        assert all("pam" in p.lower() for p in problems), problems


def test_nothing_is_written_for_what_is_not_an_endpoint(top: Path) -> None:
    out = top / "mep"
    done = import_gc(top, out)
    assert done.returncode == 2
    assert "no config.yaml" in done.stderr
    assert not out.exists()
    source = configured_endpoint(top)
    out.mkdir()
    (out / "keep").write_text("x")
    done = import_gc(source, out)
    assert done.returncode == 2 and "not empty" in done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep"]


# -- as root: a real daemon from the imported files runs a function -------------------------


# Where it runs, too: a Parsl worker of the template's GlobusComputeEngine has a rank.
WHOAMI_SOURCE = (
    "def whoami(tag):\n    import os\n"
    "    return (os.getuid(), tag, 'PARSL_WORKER_RANK' in os.environ)\n"
)


@pytest.mark.root
@pytest.mark.slow
def test_a_daemon_started_from_the_imported_files_runs_a_function(
    top: Path, make_account: Any
) -> None:
    from mepcore.client import Executor
    from tests.daemon_harness import remote_function, running_daemon
    from tests.runtime_venv import package_paths, runtime_python

    account = make_account()
    python = runtime_python()
    out = top / "mep"
    done = import_gc(configured_endpoint(top), out, "--python", python, "--port", "0")
    assert done.returncode == 0, done.stdout + done.stderr
    config = out / "mepd.yaml"
    # Test infrastructure only: the runtime's package paths (coverage of user endpoints).
    settings = yaml.safe_load(config.read_text())
    settings["spawn"] = {"package_paths": [p for p in package_paths(python) if os.path.isdir(p)]}
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    assert collect_problems(str(config)) == []
    whoami = remote_function(WHOAMI_SOURCE, "whoami")
    with running_daemon(config, out / "state") as daemon:
        # The reference's example mapping: <name>@example.com is the account <name>.
        token = daemon.token(f"{account.pw_name}@example.com")
        try:
            with Executor("gc-mu", url=daemon.url, token=token, walltime=300) as ex:
                result = ex.submit(whoami, "hello").result(timeout=300)
        except BaseException:
            print(daemon.stderr()[-6000:])
            raise
        assert result == (account.pw_uid, "hello", True)
    shutil.rmtree(out / "state", ignore_errors=True)
