"""Each user endpoint in a cgroup of its own (root: real accounts, real cgroups).

``stop`` must end everything a user endpoint started — also a double-forked child that
left the session with ``setsid`` and ignores SIGTERM, which no process-group or session
based supervisor reaches — and remove the cgroup; ``pids_max`` must bound a fork bomb.
Skipped, with the reason, only where this machine gives no writable cgroup.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest

from mepcore.spawn import (
    CgroupSettings,
    ResourceLimits,
    SpawnSettings,
    SystemCgroupPort,
    probe_cgroups,
)
from mepcore.tasks import ResultEnvelope, TaskEnvelope, pack_args, pack_function, unpack_result
from tests.runtime_venv import package_paths, runtime_python
from tests.test_registry_root import (
    Recorder,
    account_of,
    dispatch_task,
    make_registry,
    processes_of,
    request,
    run,
    until,
)

pytestmark = pytest.mark.root

PIDS_MAX = 48

ESCAPE = """\
def escape():
    import os, signal
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:
        os.setsid()  # out of the user endpoint's session and process group
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # survives exec
            os.write(ready_w, str(os.getpid()).encode())
            os.execv("/bin/sleep", ["sleep", "600"])
        os._exit(0)
    os.waitpid(child, 0)  # double fork: the grandchild is an orphan now
    return int(os.read(ready_r, 32))
"""

BOMB = """\
def bomb(tries):
    import os, signal
    children, refused = [], None
    try:
        for _ in range(tries):
            pid = os.fork()
            if pid == 0:
                signal.pause()
                os._exit(0)
            children.append(pid)
    except OSError as exc:
        refused = exc.errno
    finally:
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    return len(children), refused
"""


def by_value(source: str, name: str) -> Any:
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(source, namespace)
    return namespace[name]


@pytest.fixture(scope="module")
def cgroup_settings() -> SpawnSettings:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    probe = probe_cgroups(CgroupSettings(), SystemCgroupPort())
    if not probe.usable:
        pytest.skip(f"no writable cgroup on this machine: {probe.detail}")
    python = runtime_python()
    return SpawnSettings(
        python=python,
        package_paths=tuple(p for p in package_paths(python) if os.path.isdir(p)),
        # No RLIMIT_NPROC: what bounds the bomb below is the cgroup alone.
        limits=ResourceLimits(nproc=None, nofile=256),
        inherit_stderr=True,
        cgroup=CgroupSettings(enable="true", pids_max=PIDS_MAX, memory_max=1 << 30),
    )


def session_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as fh:
        raw = fh.read()
    return int(raw[raw.rfind(b")") + 2 :].split()[3])


def result_of(rec: Recorder, index: int = -1) -> Any:
    _uep, header, payload = rec.results[index]
    return unpack_result(ResultEnvelope.from_header(header, payload))


def test_stop_ends_a_double_forked_setsid_child_that_ignores_sigterm(
    cgroup_settings: SpawnSettings, make_account: Any
) -> None:
    account = account_of(make_account())
    rec = Recorder()
    fid, body = pack_function(by_value(ESCAPE, "escape"))

    async def scenario() -> tuple[int, int, list[str], tuple[str, ...], list[int]]:
        registry = make_registry(cgroup_settings, rec)
        try:
            handle = await registry.get_or_start(request(account))
            assert handle.pid is not None and handle.process is not None
            cgroup = handle.process.cgroup
            assert cgroup is not None, "enable: true, so the endpoint must have a cgroup"
            handle.register_function(fid, body)
            handle.dispatch([dispatch_task(TaskEnvelope("escape-1", fid, pack_args((), {})))])
            await until(lambda: len(rec.results) == 1, timeout=20)
            escaped = int(result_of(rec))
            info = await handle.introspect()
            assert await registry.stop(account.name) == 1
            # Stopped: every process of the account is gone (zombies reaped too).
            deadline = time.monotonic() + 5
            while processes_of(account.uid) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # a poll interval, not a wait for a process
            return escaped, handle.pid, info["cgroups"], cgroup.paths, processes_of(account.uid)
        finally:
            await registry.shutdown()

    escaped, leader, cgroup_lines, paths, left = run(scenario)
    assert escaped != leader
    assert any("uep-" in line for line in cgroup_lines), cgroup_lines
    assert left == []
    assert not any(os.path.exists(path) for path in paths)


def test_the_escaped_child_really_left_the_session(
    cgroup_settings: SpawnSettings, make_account: Any
) -> None:
    """The premise of the test above: only the cgroup can reach that child."""
    account = account_of(make_account())
    rec = Recorder()
    fid, body = pack_function(by_value(ESCAPE, "escape"))

    async def scenario() -> tuple[int, int, int, int]:
        registry = make_registry(cgroup_settings, rec)
        try:
            handle = await registry.get_or_start(request(account))
            assert handle.pid is not None
            handle.register_function(fid, body)
            handle.dispatch([dispatch_task(TaskEnvelope("escape-2", fid, pack_args((), {})))])
            await until(lambda: len(rec.results) == 1, timeout=20)
            escaped = int(result_of(rec))
            return escaped, session_of(escaped), handle.pid, os.getpgid(escaped)
        finally:
            await registry.shutdown()

    escaped, sid, leader, pgid = run(scenario)
    # In the session (and group) its parent made with setsid, not the user endpoint's.
    assert sid == pgid and sid not in (leader, escaped)
    assert processes_of(account.uid) == []


def test_pids_max_bounds_a_fork_bomb(cgroup_settings: SpawnSettings, make_account: Any) -> None:
    account = account_of(make_account())
    rec = Recorder()
    fid, body = pack_function(by_value(BOMB, "bomb"))
    tries = 400

    async def scenario() -> tuple[int, int | None, str]:
        registry = make_registry(cgroup_settings, rec)
        try:
            handle = await registry.get_or_start(request(account))
            assert handle.process is not None and handle.process.cgroup is not None
            handle.register_function(fid, body)
            task = TaskEnvelope("bomb-1", fid, pack_args((tries,), {}))
            handle.dispatch([dispatch_task(task)])
            await until(lambda: len(rec.results) == 1, timeout=30)
            forked, refused = result_of(rec)
            limits = [
                Path(path, "pids.max").read_text().strip()
                for path in handle.process.cgroup.paths
                if Path(path, "pids.max").exists()
            ]
            return forked, refused, ",".join(limits)
        finally:
            await registry.shutdown()

    forked, refused, limits = run(scenario)
    print(f"forked {forked} of {tries}; refused with errno {refused}; pids.max {limits}")
    assert limits == str(PIDS_MAX)
    assert 0 < forked < PIDS_MAX
    assert refused is not None  # EAGAIN from fork once the cgroup was full
    assert processes_of(account.uid) == []
