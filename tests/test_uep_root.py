"""The user endpoint process driven frame by frame (root: real accounts, real drop)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import Any

import pytest

from mepcore.ports import SystemAccountDatabase
from mepcore.spawn import (
    LaunchedProcess,
    SpawnSettings,
    launch,
    plan_spawn,
    stop_ladder_blocking,
)
from mepcore.types import Account
from mepd.channel import BlockingChannel, Frame, encode_frame
from tests.runtime_venv import runtime_spawn_settings

pytestmark = pytest.mark.root

TEMPLATE = """\
engine:
  type: ThreadPoolEngine
heartbeat_period: 0.05
idle_heartbeats_soft: {{ soft }}
idle_heartbeats_hard: {{ hard }}
{% if setup is defined %}endpoint_setup: {{ setup }}
{% endif %}{% if teardown is defined %}endpoint_teardown: {{ teardown }}
{% endif %}"""


@pytest.fixture(scope="module")
def settings() -> SpawnSettings:
    return runtime_spawn_settings()


def start_fields(account: Account, **variables: Any) -> dict[str, Any]:
    values = {"soft": 10000, "hard": 10000, **variables}
    return {
        "template_name": "t.j2",
        "template_text": TEMPLATE,
        "includes": {},
        "variables": values,
        "identity": None,
        "user_runtime": None,
        "account": account.to_dict(),
        "endpoint": "default",
        "config_key": "k",
        "setup_timeout": 10,
        "teardown_timeout": 10,
        "executor_limits": {},
    }


class Spawned:
    def __init__(self, settings: SpawnSettings, account: Account) -> None:
        ours, theirs = socket.socketpair()
        self.process: LaunchedProcess = launch(plan_spawn(account, settings, {}), theirs.fileno())
        theirs.close()
        self.sock = ours
        self.channel = BlockingChannel(ours)

    def next(self, *kinds: str, timeout: float = 10.0) -> Frame:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            frame = self.channel.recv(timeout=deadline - time.monotonic())
            if frame is not None and (not kinds or frame.kind in kinds):
                return frame
        raise AssertionError(f"no {kinds} frame before the deadline")

    def exit_status(self) -> int | None:
        assert self.process.wait_exit(10), "the user endpoint did not exit"
        return self.process.reap()

    def close(self) -> None:
        stop_ladder_blocking(self.process, ask=None, grace=1.0)
        self.sock.close()


def account_of(entry: Any) -> Account:
    account = SystemAccountDatabase().by_name(entry.pw_name)
    assert account is not None
    return account


def test_uep_refuses_to_run_with_root_privileges() -> None:
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-I", "-m", "mepd.uep", "--channel-fd", str(theirs.fileno())],
        pass_fds=(theirs.fileno(),),
        cwd="/",
    )
    theirs.close()
    frame = BlockingChannel(ours).recv(timeout=20)
    assert proc.wait(20) == 3
    ours.close()
    assert frame is not None and frame.kind == "error"
    assert frame.header["reason"] == "spawn.privilege_drop"


def test_heartbeats_drain_and_exit_report(settings: SpawnSettings, make_account: Any) -> None:
    account = account_of(make_account())
    uep = Spawned(settings, account)
    try:
        uep.channel.send("start", start_fields(account))
        ready = uep.next("ready", "error")
        assert ready.kind == "ready" and ready.header["uid"] == account.uid
        beat = uep.next("heartbeat")
        assert beat.header["in_flight"] == 0
        uep.channel.send("drain")
        bye = uep.next("exiting")
        assert bye.header["reason"] == "drained"
        assert uep.exit_status() == 0
    finally:
        uep.close()


def test_stop_runs_teardown_as_the_user(settings: SpawnSettings, make_account: Any) -> None:
    account = account_of(make_account())
    marker = os.path.join(account.home, "teardown-ran")
    uep = Spawned(settings, account)
    try:
        uep.channel.send("start", start_fields(account, teardown=f"id -u > {marker}"))
        assert uep.next("ready", "error").kind == "ready"
        uep.channel.send("stop", {"reason": "test"})
        assert uep.next("exiting").header["reason"] == "stopped: test"
        assert uep.exit_status() == 0
    finally:
        uep.close()
    st = os.stat(marker)
    assert (st.st_uid, st.st_mode & 0o777) == (account.uid, 0o600)  # umask 077
    with open(marker) as fh:
        assert fh.read().strip() == str(account.uid)


def test_failing_setup_is_a_start_error(settings: SpawnSettings, make_account: Any) -> None:
    account = account_of(make_account())
    uep = Spawned(settings, account)
    try:
        uep.channel.send("start", start_fields(account, setup="exit 7"))
        error = uep.next("ready", "error")
        assert error.kind == "error" and error.header["reason"] == "spawn.start_failed"
        assert "status 7" in error.header["detail"]
        assert uep.exit_status() == 2
    finally:
        uep.close()


def test_render_error_carries_reason_and_violations(
    settings: SpawnSettings, make_account: Any
) -> None:
    account = account_of(make_account())
    uep = Spawned(settings, account)
    try:
        fields = start_fields(account)
        fields["template_text"] = "engine:\n  type: NoSuchEngine\n"
        uep.channel.send("start", fields)
        error = uep.next("ready", "error")
        assert error.kind == "error"
        assert error.header["reason"] == "config.endpoint_config_invalid"
        assert error.header["violations"]
        assert uep.exit_status() == 2
    finally:
        uep.close()


def test_malformed_frame_ends_the_user_endpoint(settings: SpawnSettings, make_account: Any) -> None:
    account = account_of(make_account())
    uep = Spawned(settings, account)
    try:
        uep.channel.send("start", start_fields(account))
        assert uep.next("ready", "error").kind == "ready"
        uep.sock.sendall(b"\x00\x00\x00\x08\x00\x00\x00\x04{{{{")
        bye = uep.next("exiting")
        assert bye.header["reason"].startswith("channel_invalid")
        assert uep.exit_status() == 0
    finally:
        uep.close()


def test_channel_close_ends_the_user_endpoint(settings: SpawnSettings, make_account: Any) -> None:
    account = account_of(make_account())
    uep = Spawned(settings, account)
    try:
        uep.channel.send("start", start_fields(account))
        assert uep.next("ready", "error").kind == "ready"
        uep.sock.shutdown(socket.SHUT_WR)  # the daemon's end says goodbye
        assert uep.exit_status() == 0
    finally:
        uep.close()


def test_hard_idle_limit_ends_a_stuck_endpoint(settings: SpawnSettings, make_account: Any) -> None:
    from mepcore.tasks import TaskEnvelope, pack_args, pack_function

    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec("def stuck():\n    import time\n    time.sleep(30)\n", namespace)
    fid, body = pack_function(namespace["stuck"])
    account = account_of(make_account())
    uep = Spawned(settings, account)
    try:
        uep.channel.send("start", start_fields(account, soft=3, hard=6))
        assert uep.next("ready", "error").kind == "ready"
        uep.channel.send("function", {"items": [{"function_id": fid}]}, [body])
        task = TaskEnvelope("stuck-1", fid, pack_args((), {}))
        uep.channel.send_buffers(
            encode_frame("task", {"items": [task.to_header()]}, [task.payload])
        )
        result = uep.next("result", timeout=15)
        bye = uep.next("exiting", timeout=15)
        # Busy, so never "idle"; but no progress for 6 heartbeats: the stuck task is
        # failed (not silently dropped) before the final frame.
        assert bye.header["reason"] == "idle_hard"
        (header,) = result.header["items"]
        assert header["task_id"] == "stuck-1" and header["status"] == "failed"
        assert bye.header["in_flight"] == 0
    finally:
        uep.close()
