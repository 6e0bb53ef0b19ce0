"""The conformance suite against a live ``mepd`` on loopback, through the http adapter.

Root: two real accounts (useradd, removed afterwards), a daemon started from a
temporary deployment, and a deployment profile written the way a site would write one
(tokens from ``mepd token issue``, the accounts the identities map to, the variable
sets, a restart command for the durability cases). The runner runs as a subprocess,
exactly as a site runs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_conformance import REPO, mepconf, summary_of, verdicts

pytestmark = pytest.mark.root

RESTART = """#!/bin/sh
# Kill the daemon without warning (as a crash would) and start it again.
set -e
pid="$(cat {pidfile})"
kill -9 "$pid" 2>/dev/null || true
# Dead is gone or a zombie (the test process reaps its own child later); bounded wait.
i=0
while [ $i -lt 200 ] && [ -e /proc/$pid ] && ! grep -q ') Z ' /proc/$pid/stat 2>/dev/null; do
  sleep 0.05; i=$((i + 1))
done
cd {repo}
setsid {python} -m mepd serve --config {config} >>{log} 2>&1 </dev/null &
echo $! > {pidfile}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and " Z " not in Path(f"/proc/{pid}/stat").read_text()


def _stop(pid: int, deadline: float = 30.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + deadline
    while _alive(pid) and time.monotonic() < end:
        time.sleep(0.05)  # polling interval of a deadline loop
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if os.geteuid() != 0:
        pytest.skip("needs root: user endpoints run as real accounts")
    from tests.accounts import create_account, delete_account
    from tests.daemon_harness import start_daemon, write_deployment
    from tests.runtime_venv import runtime_python

    alice, bob = create_account(), create_account()
    top = tmp_path_factory.mktemp("conformance-http")
    python = runtime_python()
    port = _free_port()
    config = write_deployment(
        top,
        python=python,
        policy_extra=["p, username:denied@example.org, hpc, **, *, -, deny"],
        limits={"max_body_bytes": 1_048_576},
        settings_extra={"listen": {"host": "127.0.0.1", "port": port}},
    )
    # A denied identity that maps to a real account (mapping succeeds, policy refuses).
    mapping = json.loads((top / "mapping.json").read_text())
    mapping[0]["mappings"].append(
        {"source": "{username}", "match": "denied@example.org", "literal": True,
         "output": alice.pw_name}
    )  # fmt: skip
    (top / "mapping.json").write_text(json.dumps(mapping))
    # A variable that makes the template fail to render (for MEP-UEP-010).
    schema_path = top / "templates" / "user_config_schema.json"
    schema = json.loads(schema_path.read_text())
    schema["properties"]["fail_render"] = {"type": "boolean"}
    schema_path.write_text(json.dumps(schema))
    template = top / "templates" / "user_config_template.yaml.j2"
    template.write_text(
        template.read_text()
        + "{% if fail_render | default(false) %}display_name: {{ no_such_variable }}\n{% endif %}"
    )
    daemon = start_daemon(config, top / "state")
    pidfile = top / "mepd.pid"
    pidfile.write_text(str(daemon.process.pid))
    restart = top / "restart.sh"
    restart.write_text(
        RESTART.format(
            pidfile=pidfile, repo=REPO, python=sys.executable, config=config, log=top / "mepd.log"
        )
    )
    restart.chmod(0o700)

    def token(identity: str) -> dict[str, Any]:
        command = [sys.executable, "-m", "mepd", "token", "issue", "--config", str(config)]
        return {"token_command": [*command, "--identity", identity]}

    profile = {
        "url": daemon.url,
        "endpoint": "hpc",
        "timeout": 120,
        "identities": {
            "alice": {**token(f"{alice.pw_name}@example.org"), "account": alice.pw_name},
            "bob": {**token(f"{bob.pw_name}@example.org"), "account": bob.pw_name},
            "unmapped": token("stranger@elsewhere.org"),
            "denied": {**token("denied@example.org"), "account": alice.pw_name},
        },
        "variables": {
            "valid": {"engine": "ProcessPoolEngine", "max_workers": 1},
            "other": {"engine": "ProcessPoolEngine", "max_workers": 2},
            "invalid": {"max_workers": 100, "bogus": True},
            "render_failure": {"engine": "ProcessPoolEngine", "fail_render": True},
        },
        "environment_keys": ["OMP_NUM_THREADS", "MKL_NUM_THREADS"],
        "properties": ["root", "two_accounts", "spawn", "tasks", "walltime", "worker_crash",
                       "restart"],
        "max_body_bytes": 1_048_576,
        "restart_command": [str(restart)],
    }  # fmt: skip
    profile_path = top / "profile.json"
    profile_path.write_text(json.dumps(profile, indent=2))
    try:
        yield {"profile": profile_path, "url": daemon.url, "top": top}
    finally:
        with contextlib.suppress(ValueError, OSError):
            _stop(int(pidfile.read_text()))
        daemon.stop()
        delete_account(alice.pw_name)
        delete_account(bob.pw_name)


def test_whole_suite_against_a_live_daemon(deployment: dict[str, Any]) -> None:
    done = mepconf(
        "run", "--adapter", "http", "--profile", str(deployment["profile"]),
        "--format", "text", timeout=1200,
    )  # fmt: skip
    log = deployment["top"] / "mepd.log"
    bad = [line for line in done.stdout.splitlines() if line.startswith(("FAIL", "ERROR", "XPASS"))]
    detail = "\n".join(bad) + "\n" + done.stdout[-300:] + done.stderr[-3000:]
    if log.exists():
        detail += log.read_text(errors="replace")[-3000:]
    assert done.returncode == 0, detail
    counts = summary_of(done.stdout)
    assert counts["failed"] == 0
    assert counts["errors"] == 0
    table = verdicts(done.stdout)
    # What only a live daemon can show must have run, not been skipped.
    for prefix in ("api/requests/", "task/run/", "uep/identity/", "durability/restart/"):
        ran = [k for k, v in table.items() if k.startswith(prefix) and v == "PASS"]
        assert ran, f"no case of {prefix} passed:\n{detail}"


def test_a_permissive_policy_fails_the_policy_cases(
    deployment: dict[str, Any], tmp_path: Path
) -> None:
    """The same profile with the 'denied' identity swapped for an allowed one: the
    case that requires a denial must fail (the suite notices a permissive policy)."""
    profile = json.loads(Path(deployment["profile"]).read_text())
    profile["identities"]["denied"] = profile["identities"]["alice"]
    path = tmp_path / "permissive.json"
    path.write_text(json.dumps(profile))
    done = mepconf("run", "--adapter", "http", "--profile", str(path), "--select", "MEP-API-005")
    assert done.returncode == 1
    assert set(verdicts(done.stdout).values()) == {"FAIL"}
