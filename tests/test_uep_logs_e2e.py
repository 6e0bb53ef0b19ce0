"""The user's endpoint log, end to end as root: a real ``mepd serve``, real accounts.

A failing ``endpoint_setup`` shows its stderr to the caller (the 503's message names the
log and carries its last lines) and in ``mep logs``; the log is written as the user in
``~/.mep/endpoints/<endpoint>/endpoint.log`` (0600 in a 0700 directory); the route shows
the caller's own log only, bounded by ``lines``, and the daemon reads it as the user, so
a link to a root-only file yields nothing of it."""

from __future__ import annotations

import base64
import os
import pwd
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mepcore.tasks import pack_args, pack_function
from tests.daemon_harness import RunningDaemon, daemon_with_accounts, remote_function

pytestmark = [pytest.mark.root, pytest.mark.slow]

TEMPLATE = """\
engine:
  type: ThreadPoolEngine
  max_workers: 1
idle_heartbeats_soft: 30
idle_heartbeats_hard: 5760
endpoint_setup: {{ endpoint_setup | default() }}
endpoint_teardown: {{ endpoint_teardown | default() }}
"""
SCHEMA = (
    '{"type": "object", "additionalProperties": false,'
    ' "properties": {"endpoint_setup": {"type": "string"},'
    ' "endpoint_teardown": {"type": "string"}}}'
)
FAILING_SETUP = "echo preparing the node; echo 'module: gcc/99.1 not found' >&2; exit 3"
FAILING = {"endpoint_setup": FAILING_SETUP}
SECRET = "root-only-secret-7f3a"
ECHO = remote_function("def echo(x):\n    print('printed by the task')\n    return x\n", "echo")
MEP = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "mep"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RunningDaemon, list[pwd.struct_passwd]]]:
    top = tmp_path_factory.mktemp("logs") / "site"
    with daemon_with_accounts(top, 2, template=TEMPLATE, schema=SCHEMA) as deployed:
        yield deployed


def _submit(client: Any, variables: dict[str, Any]) -> Any:
    fid, body = pack_function(ECHO)
    r = client.post("/v1/functions", json={"function": b64(body)})
    assert r.status_code == 200, r.text
    return client.post(
        "/v1/endpoints/hpc/submit",
        json={
            "user_endpoint_config": variables,
            "tasks": [{"function_id": fid, "args": b64(pack_args((1,), {}))}],
        },
    )


def _mep(daemon: RunningDaemon, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MEP), *args],
        env={"MEP_URL": daemon.url, "MEP_TOKEN": token, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_failing_endpoint_setup_shows_its_stderr_to_the_caller_and_in_mep_logs(
    deployment: tuple[RunningDaemon, list[pwd.struct_passwd]],
) -> None:
    daemon, (one, two) = deployment
    token = daemon.token(f"{one.pw_name}@example.org")
    client = daemon.client(token)
    r = _submit(client, {"endpoint_setup": FAILING_SETUP})
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["reason"] == "spawn.start_failed"
    log = Path(one.pw_dir) / ".mep" / "endpoints" / "hpc" / "endpoint.log"
    assert error["log"]["path"] == str(log)
    assert error["log"]["tail"][-3:] == [
        "preparing the node",
        "module: gcc/99.1 not found",
        "endpoint_setup exited with status 3",
    ]
    # The client's exception carries them too.
    from mepcore.client import Client
    from mepcore.client.errors import RequestRefused

    with Client(daemon.url, token) as sdk, pytest.raises(RequestRefused) as refused:
        sdk.submit("hpc", sdk.register_function(ECHO), (1,), user_endpoint_config=FAILING)
    assert "module: gcc/99.1 not found" in str(refused.value)
    assert str(log) in str(refused.value)

    # Written as the user, private to the user.
    info = log.stat()
    assert (info.st_uid, info.st_gid) == (one.pw_uid, one.pw_gid)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert stat.S_IMODE(log.parent.stat().st_mode) == 0o700

    # mep logs shows it, through the daemon.
    shown = _mep(daemon, token, "logs", "hpc")
    assert shown.returncode == 0, shown.stderr
    assert "module: gcc/99.1 not found" in shown.stdout
    assert "preparing the node" in shown.stdout
    assert "start_failed" in shown.stdout

    # A start that works logs its start, readiness and what the task printed.
    r = _submit(client, {"endpoint_teardown": "echo tearing down the scratch space"})
    assert r.status_code == 200, r.text
    answer = client.get("/v1/endpoints/hpc/log", params={"lines": 3}).json()
    assert answer["exists"] is True and answer["path"] == str(log)
    assert len(answer["lines"]) <= 3
    # (the task's print arrives through the captured stdout: poll for it)
    from tests.test_client_fakes import wait_until

    def printed() -> bool:
        r = client.get("/v1/endpoints/hpc/log", params={"lines": 200})
        if r.status_code == 429:  # the per-identity rate limit of the edge
            return False
        assert r.status_code == 200, [
            line for line in daemon.stderr().splitlines() if "log_unavailable" in line
        ][-3:]
        lines = r.json()["lines"]
        return any("printed by the task" in line for line in lines) and any(
            "ready" in line for line in lines
        )

    wait_until(printed, 30, "the task's output in the endpoint log")

    # endpoint_teardown's output too, when the user endpoint stops.
    assert client.post("/v1/endpoints/hpc/stop").json() == {"stopped": 1}
    teardown = [line for line in log.read_text().splitlines() if "endpoint_teardown" in line]
    assert teardown and teardown[-1].endswith("endpoint_teardown: tearing down the scratch space")

    # Bounded and checked: lines out of range is a 400.
    r = client.get("/v1/endpoints/hpc/log", params={"lines": 0})
    assert r.status_code == 400
    assert r.json()["error"]["reason"] == "api.bad_request"

    # Another account sees its own (absent) log, nothing of the first one's.
    other = _mep(daemon, daemon.token(f"{two.pw_name}@example.org"), "logs", "hpc")
    assert other.returncode == 0
    assert "gcc/99.1" not in other.stdout + other.stderr
    assert f"{two.pw_dir}/.mep/endpoints/hpc/endpoint.log" in other.stderr


def test_the_daemon_reads_the_log_as_the_user_so_a_link_to_a_root_file_yields_nothing(
    deployment: tuple[RunningDaemon, list[pwd.struct_passwd]], tmp_path: Path
) -> None:
    daemon, (_, two) = deployment
    secret = Path("/root") / f"mep-test-secret-{two.pw_name}"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    directory = Path(two.pw_dir) / ".mep" / "endpoints" / "hpc"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for part in (directory, directory.parent, directory.parent.parent):
            os.chown(part, two.pw_uid, two.pw_gid)
        link = directory / "endpoint.log"
        link.unlink(missing_ok=True)
        link.symlink_to(secret)
        os.lchown(link, two.pw_uid, two.pw_gid)
        client = daemon.client(daemon.token(f"{two.pw_name}@example.org"))
        r = client.get("/v1/endpoints/hpc/log")
        assert SECRET not in r.text
        assert r.status_code == 503, r.text
        assert r.json()["error"]["reason"] == "spawn.log_unavailable"
    finally:
        secret.unlink()
