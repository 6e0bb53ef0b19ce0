"""Spawn boundaries with real accounts (root): the home is entered as the user, the user
endpoint sets no_new_privs on itself, and a failed privilege drop names the failing call.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import attrs
import pytest

from mepcore.ports import SystemAccountDatabase
from mepcore.spawn import SpawnSettings, launch, plan_spawn, stop_ladder_blocking
from mepcore.types import Account
from mepd.channel import BlockingChannel, Frame
from tests.runtime_venv import runtime_spawn_settings

pytestmark = pytest.mark.root

TEMPLATE = """\
engine:
  type: ThreadPoolEngine
heartbeat_period: 0.05
idle_heartbeats_soft: 10000
idle_heartbeats_hard: 10000
{% if setup is defined %}endpoint_setup: {{ setup }}
{% endif %}"""


@pytest.fixture(scope="module")
def settings() -> SpawnSettings:
    return runtime_spawn_settings()


def account_of(entry: Any) -> Account:
    account = SystemAccountDatabase().by_name(entry.pw_name)
    assert account is not None
    return account


class Endpoint:
    """A user endpoint driven over its channel, started and told to render."""

    def __init__(self, settings: SpawnSettings, account: Account, **variables: Any) -> None:
        ours, theirs = socket.socketpair()
        self.process = launch(plan_spawn(account, settings, {}), theirs.fileno())
        theirs.close()
        self.sock = ours
        self.channel = BlockingChannel(ours)
        try:
            self._start(account, variables)
        except BaseException:
            self.close()
            raise

    def _start(self, account: Account, variables: dict[str, Any]) -> None:
        self.channel.send(
            "start",
            {
                "template_name": "t.j2",
                "template_text": TEMPLATE,
                "includes": {},
                "variables": variables,
                "identity": None,
                "user_runtime": None,
                "account": account.to_dict(),
                "endpoint": "default",
                "config_key": "k",
                "setup_timeout": 10,
                "teardown_timeout": 10,
                "executor_limits": {},
            },
        )
        ready = self.next("ready", "error")
        assert ready.kind == "ready", ready.header

    def next(self, *kinds: str, timeout: float = 20.0) -> Frame:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            frame = self.channel.recv(timeout=deadline - time.monotonic())
            if frame is not None and (not kinds or frame.kind in kinds):
                return frame
        raise AssertionError(f"no {kinds} frame before the deadline")

    def introspect(self) -> dict[str, Any]:
        self.channel.send("introspect", {"request_id": 1})
        answer: dict[str, Any] = self.next("introspect").header["answer"]
        return answer

    def close(self) -> None:
        stop_ladder_blocking(self.process, ask=None, grace=1.0)
        self.sock.close()


@pytest.fixture
def root_only_directory() -> Iterator[str]:
    """A stand-in for /root: owned by root, mode 700, with a file in it. (Not /root
    itself: ``userdel --remove --force`` of an account whose home is a link to /root —
    a crashed test's leftover — would delete what /root holds.)"""
    path = tempfile.mkdtemp(prefix="mep-root-only-", dir="/var/tmp")
    os.chmod(path, 0o700)
    with open(os.path.join(path, "secret"), "w") as fh:
        fh.write("root's\n")
    yield path
    shutil.rmtree(path)


@pytest.mark.parametrize("how", ["linked", "root_owned"])
def test_a_home_the_account_cannot_enter_leaves_the_endpoint_in_slash(
    settings: SpawnSettings,
    make_account: Any,
    root_only_directory: str,
    capfd: pytest.CaptureFixture[str],
    how: str,
) -> None:
    entry = make_account()
    home = entry.pw_dir
    saved = home + ".saved"
    os.rename(home, saved)
    try:
        if how == "linked":
            os.symlink(root_only_directory, home)  # home -> a root-only directory
        else:
            os.mkdir(home, 0o700)  # a home root made and never gave away
        uep = Endpoint(settings, account_of(entry))
        try:
            info = uep.introspect()
        finally:
            uep.close()
    finally:
        if os.path.islink(home):
            os.unlink(home)
        else:
            shutil.rmtree(home, ignore_errors=True)
        os.rename(saved, home)  # userdel --remove then removes a real directory
    assert info["uid"] == entry.pw_uid
    assert info["cwd"] == "/"
    err = capfd.readouterr().err
    assert "staying in /" in err and home in err


def test_the_home_is_entered_as_the_user(settings: SpawnSettings, make_account: Any) -> None:
    entry = make_account()
    uep = Endpoint(settings, account_of(entry))
    try:
        info = uep.introspect()
    finally:
        uep.close()
    assert info["cwd"] == entry.pw_dir


@pytest.mark.parametrize("on", [True, False])
def test_no_new_privs_is_set_before_anything_of_the_users_runs(
    settings: SpawnSettings, make_account: Any, on: bool
) -> None:
    entry = make_account()
    marker = os.path.join(entry.pw_dir, "nnp")
    # endpoint_setup is the first thing of the user's that runs: it sees the flag.
    setup = f"grep NoNewPrivs /proc/self/status > {marker}"
    uep = Endpoint(attrs.evolve(settings, no_new_privs=on), account_of(entry), setup=setup)
    try:
        with open(f"/proc/{uep.process.pid}/status") as fh:
            status = dict(line.split(":", 1) for line in fh if ":" in line)
        info = uep.introspect()
    finally:
        uep.close()
    with open(marker) as fh:
        seen_by_setup = fh.read().split()[-1]
    expected = "1" if on else "0"
    assert status["NoNewPrivs"].strip() == expected
    assert seen_by_setup == expected
    assert info["no_new_privs"] is on


def _unshare_works() -> bool:
    try:
        done = subprocess.run(
            ["unshare", "--user", "--map-root-user", "true"], capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


LAUNCH_SCRIPT = """
import json, socket, sys
from mepcore.errors import SpawnError
from mepcore.ports import SystemAccountDatabase
from mepcore.spawn import SpawnSettings, launch, plan_spawn

account = SystemAccountDatabase().by_name(sys.argv[1])
plan = plan_spawn(account, SpawnSettings(python=sys.argv[2]), {})
ours, theirs = socket.socketpair()
try:
    launch(plan, theirs.fileno())
except SpawnError as exc:
    print(json.dumps({"reason": exc.reason, "detail": exc.detail, "uid": plan.uid}))
else:
    print(json.dumps({"reason": None}))
"""


def test_a_failed_privilege_drop_names_the_call(settings: SpawnSettings, make_account: Any) -> None:
    """In a user namespace that maps only uid 0, the daemon is "root" but cannot become
    anyone else: the start fails closed, as a privilege drop, naming the call."""
    if not _unshare_works():
        pytest.skip("unshare --user --map-root-user does not work here")
    entry = make_account()
    unshare = ["unshare", "--user", "--map-root-user"]
    done = subprocess.run(
        [*unshare, sys.executable, "-c", LAUNCH_SCRIPT, entry.pw_name, settings.python],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        check=False,
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    print(answer)
    assert answer["reason"] == "spawn.privilege_drop"
    # setgroups comes first, and an unprivileged user namespace denies it.
    assert "setgroups" in answer["detail"] and "EPERM" in answer["detail"]
    assert entry.pw_dir not in answer["detail"]
