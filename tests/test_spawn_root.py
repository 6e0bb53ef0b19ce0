"""The launcher and the stop ladder with real accounts (root): every rung, no leftovers."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import attrs
import pytest

from mepcore.ports import SystemAccountDatabase
from mepcore.spawn import (
    ResourceLimits,
    SpawnSettings,
    become_subreaper,
    launch,
    plan_spawn,
    reap_adopted_orphans,
    session_members,
    stop_ladder,
    stop_ladder_blocking,
)
from tests.accounts import processes_of

pytestmark = pytest.mark.root

SETTINGS = SpawnSettings(python="/bin/sh", limits=ResourceLimits(nproc=32, nofile=64))


def launch_script(entry: Any, script: str) -> Any:
    account = SystemAccountDatabase().by_name(entry.pw_name)
    assert account is not None
    # The plan is a value: swap the user endpoint for a shell script with the same
    # identity, session, limits and environment.
    ours, theirs = socket.socketpair()
    script = script.replace("CHANNEL", str(theirs.fileno()))
    plan = attrs.evolve(plan_spawn(account, SETTINGS, {}), argv=("/bin/bash", "-c", script))
    try:
        return launch(plan, theirs.fileno()), ours
    finally:
        theirs.close()


def test_ladder_escalates_to_sigterm_then_sigkill(make_account: Any) -> None:
    entry = make_account()
    become_subreaper()
    stubborn, sock1 = launch_script(entry, "trap '' TERM; while :; do sleep 1; done")
    polite, sock2 = launch_script(entry, "exec sleep 60")
    try:
        killed = stop_ladder_blocking(stubborn, ask=None, grace=0.3)
        termed = stop_ladder_blocking(polite, ask=None, grace=5)
    finally:
        sock1.close()
        sock2.close()
    assert killed.step == "killed" and killed.returncode == -9
    assert termed.step == "terminated" and termed.returncode == -15
    assert processes_of(entry.pw_uid) == []


def test_ask_rung_and_session_cleanup_of_orphans(make_account: Any) -> None:
    entry = make_account()
    become_subreaper()
    # The leader leaves orphaned grandchildren behind in its session when asked to go.
    # The script waits on its channel descriptor, like a user endpoint (bash: dash only
    # redirects single-digit descriptors).
    script = "(sleep 60 &); (sleep 60 &); read line <&CHANNEL; exit 0"
    process, sock = launch_script(entry, script)

    async def scenario() -> Any:
        return await stop_ladder(process, ask=lambda: sock.sendall(b"stop\n"), grace=5)

    try:
        outcome = asyncio.run(scenario())
    finally:
        sock.close()
    assert outcome.step == "asked" and outcome.returncode == 0
    assert session_members(process.pid) == []
    assert processes_of(entry.pw_uid) == []


def test_limits_are_set_on_the_child(make_account: Any) -> None:
    entry = make_account()
    process, sock = launch_script(entry, "exec sleep 60")
    try:
        with open(f"/proc/{process.pid}/limits") as fh:
            limits = fh.read()
    finally:
        stop_ladder_blocking(process, ask=None, grace=2)
        sock.close()
    # Either the launcher could prlimit (CAP_SYS_RESOURCE), or it could not; the real
    # user endpoint then lowers its own limits (tested through introspect).
    nproc = next(line for line in limits.splitlines() if line.startswith("Max processes"))
    if "32" not in nproc:
        pytest.skip("no CAP_SYS_RESOURCE here: the launcher cannot prlimit other accounts")
    assert nproc.split()[2:4] == ["32", "32"]


def test_the_subreaper_reaps_orphans_of_endpoints_not_the_daemons_own_children(
    make_account: Any,
) -> None:
    """An orphan of a user endpoint (another uid, another session) is reaped; a child the
    daemon started itself as that user (same session) keeps its exit status."""
    import os
    import select
    import subprocess

    entry = make_account()
    become_subreaper()
    # The daemon's own child, run as the user, exits 3 and is left a zombie for its starter.
    own = subprocess.Popen(["/bin/sh", "-c", "exit 3"], user=entry.pw_uid, group=entry.pw_gid)
    os.waitid(os.P_PID, own.pid, os.WEXITED | os.WNOWAIT)
    # An endpoint-like leader in its own session whose grandchild is orphaned (its parent,
    # a subshell, exits at once): it becomes ours, as the subreaper's. It says its pid.
    leader, sock = launch_script(
        entry, "( /bin/sleep 0.01 & echo $! >&CHANNEL ); exec /bin/sleep 30"
    )
    try:
        sock.settimeout(10)
        orphan = int(sock.recv(64).split()[0])
        pidfd = os.pidfd_open(orphan)
        try:
            assert select.select([pidfd], [], [], 10)[0]  # it has exited: a zombie of ours
        finally:
            os.close(pidfd)
        reaped = reap_adopted_orphans(keep={leader.pid})
        assert orphan in reaped and own.pid not in reaped
        assert own.wait(timeout=10) == 3  # its status was left to its starter
    finally:
        sock.close()
        stop_ladder_blocking(leader, ask=None, grace=2)
