"""The launcher: execute a ``SpawnPlan``, set its limits, stop it with a ladder, reap it.

``launch(plan, channel_fd)`` checks that the account can run the interpreter and read
the packages, then starts the process with ``subprocess.Popen(user=, group=,
extra_groups=, umask=0o077, start_new_session=True, close_fds=True, pass_fds=(channel,),
env=, cwd="/")`` — the user endpoint enters the home itself, as the user. A pre-exec
Python hook is banned (it is unsafe with threads and runs Python in the
child before the drop), so resource limits are applied twice: the plan's argv carries
them (``--rlimit=NAME=VALUE``) and the user endpoint lowers its own limits right after
proving the drop, before it reads its start message (lowering needs no privilege); and
the launcher also sets them from the parent with ``resource.prlimit(pid, …)`` when it
holds CAP_SYS_RESOURCE (containers often drop that capability; then the child's own
setting is what counts). Either way no user code runs before the limits are in place:
the user endpoint runs nothing of the user's before its start message, and the daemon
sends that only after ``launch`` returns. For the same reason the daemon can move the
new process into its cgroup (``mepcore.spawn.cgroup``) right after ``Popen`` returns:
nothing of the user's has run by then.

When the start fails before the exec, subprocess reports only an errno (and Python 3.11
blames ``cwd`` for any of them). If identities were to change, a throwaway child forked
on that error path repeats the drop — ``setgroups``, ``setregid``, ``setreuid``, in
subprocess's order — and names the call that fails: ``spawn.privilege_drop``.

The stop ladder asks over the channel (a callable supplied by the caller), then sends
SIGTERM to the process group, then SIGKILL, each step with an injected grace period. It
is written once, as a coroutine; the blocking form runs it in a private event loop.
Reaping kills what is left of the process's *session* (workers, stray children —
``start_new_session`` makes the user endpoint the leader of both its session and its
group) while the leader is still an unreaped zombie, so the session id cannot have been
reused by then. What left the session (``setsid``, double forks) is reached through the
user endpoint's cgroup, which reaping ends and removes.

Deliberately not here: the channel protocol (mepd) and any decision about *when* to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import resource
import select
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Collection

import attrs

from mepcore.errors import SpawnError
from mepcore.spawn.access import check_runtime_readable
from mepcore.spawn.cgroup import Cgroups, EndpointCgroup
from mepcore.spawn.plan import SpawnPlan

_PR_SET_CHILD_SUBREAPER = 36


@attrs.define
class LaunchedProcess:
    """A running user endpoint process: its Popen, a pidfd to watch it, its plan, and its
    cgroup (None where the machine allows none)."""

    popen: subprocess.Popen[bytes]
    plan: SpawnPlan
    pidfd: int
    returncode: int | None = None
    cgroup: EndpointCgroup | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def has_exited(self) -> bool:
        """True once the process has exited (it may still be an unreaped zombie)."""
        if self.returncode is not None:
            return True
        return self.wait_exit(0)

    def wait_exit(self, timeout: float) -> bool:
        """Block until the process exits or ``timeout`` passes; does not reap."""
        if self.returncode is not None or self.pidfd < 0:
            return True
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        return bool(poller.poll(max(0, int(timeout * 1000))))

    async def wait_exit_async(self, timeout: float) -> bool:
        """Wait in the event loop (no thread) until the process exits or ``timeout``."""
        if self.has_exited():
            return True
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not done.done():
                done.set_result(None)

        loop.add_reader(self.pidfd, readable)
        try:
            await asyncio.wait_for(asyncio.shield(done), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            loop.remove_reader(self.pidfd)

    def signal_group(self, sig: int) -> bool:
        """Send ``sig`` to the process group; False when nothing is left to signal.

        Safe against pid reuse as long as the leader has not been reaped: ``reap`` is the
        only place that reaps it.
        """
        if self.returncode is not None:
            return False
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def reap(self, *, deadline: float = 2.0) -> int | None:
        """Kill what is left of the cgroup and the session, reap them, then reap the
        leader and remove the cgroup.

        Call once the leader has exited (or to force it). Returns the exit status.
        """
        if self.returncode is not None:
            return self.returncode
        if not self.has_exited():
            self.signal_group(signal.SIGKILL)
            self.wait_exit(deadline)
        self.end_cgroup(deadline=deadline)
        kill_session(self.pid, deadline=deadline)
        try:
            self.returncode = self.popen.wait(timeout=deadline)
        except subprocess.TimeoutExpired:
            return None
        self.close()
        if self.cgroup is not None:
            self.cgroup.remove(timeout=deadline)
        return self.returncode

    def end_cgroup(self, *, deadline: float = 2.0) -> list[int]:
        """SIGKILL everything in the cgroup (double-forked, ``setsid``, SIGTERM-ignoring
        descendants too) and reap those re-parented to this process (a subreaper)."""
        if self.cgroup is None:
            return []
        ended = self.cgroup.end(timeout=deadline)
        for pid in ended:
            if pid != self.pid:
                _reap_if_of(pid, self.plan.uid)
        return ended

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def launch(
    plan: SpawnPlan,
    channel_fd: int,
    *,
    check_access: bool = True,
    cgroups: Cgroups | None = None,
    adoptable: bool = False,
) -> LaunchedProcess:
    """Start the user endpoint of ``plan`` with ``channel_fd`` as its only extra descriptor,
    in a cgroup of its own when ``cgroups`` has one to give (``adoptable``: one that no
    other daemon's reclaim ends, for an endpoint meant to outlive its daemon)."""
    if check_access:
        check_runtime_readable(
            plan.python,
            plan.package_paths,
            uid=plan.uid,
            gids=plan.groups,
            account=plan.account.name,
        )
    argv = [*plan.argv, "--channel-fd", str(channel_fd)]
    identity: dict[str, object] = {}
    if os.geteuid() == 0:
        identity = {"user": plan.uid, "group": plan.gid, "extra_groups": list(plan.groups)}
    elif os.geteuid() != plan.uid:
        raise SpawnError(
            "spawn.launch_failed",
            f"the daemon runs as uid {os.geteuid()} and cannot start processes as {plan.uid}",
        )
    cgroup = (
        cgroups.create(adoptable=adoptable) if cgroups is not None and cgroups.available else None
    )
    try:
        process = _start(plan, argv, channel_fd, identity)
    except BaseException:
        if cgroup is not None:
            cgroup.remove(timeout=2.0)
        raise
    process.cgroup = cgroup
    if cgroup is not None:
        try:
            cgroup.attach(process.pid)
        except OSError as exc:
            process.signal_group(signal.SIGKILL)
            process.reap()
            raise SpawnError(
                "spawn.cgroup_failed",
                f"moving the user endpoint of {plan.account.name} into {cgroup.name} failed: {exc}",
            ) from exc
    try:
        apply_limits(process.pid, plan)
    except OSError as exc:
        process.signal_group(signal.SIGKILL)
        process.reap()
        raise SpawnError("spawn.launch_failed", f"setting resource limits failed: {exc}") from exc
    return process


def _start(
    plan: SpawnPlan, argv: list[str], channel_fd: int, identity: dict[str, object]
) -> LaunchedProcess:
    try:
        popen = subprocess.Popen(  # type: ignore[call-overload]
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=None if plan.inherit_stderr else subprocess.DEVNULL,
            env=dict(plan.env),
            cwd=plan.cwd,
            umask=plan.umask,
            start_new_session=True,
            close_fds=True,
            pass_fds=(channel_fd,),
            **identity,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        failed = diagnose_privilege_drop(plan.uid, plan.gid, plan.groups) if identity else None
        if failed is not None:
            call, error = failed
            raise SpawnError(
                "spawn.privilege_drop",
                f"dropping privileges to the account {plan.account.name} failed: {call} "
                f"refused with {errno.errorcode.get(error, error)} ({os.strerror(error)}); "
                "nothing ran as the account",
                context={"call": call, "errno": error},
            ) from exc
        raise SpawnError(
            "spawn.launch_failed",
            f"starting the user endpoint of {plan.account.name} failed: {exc}",
        ) from exc
    assert isinstance(popen, subprocess.Popen)
    try:
        pidfd = os.pidfd_open(popen.pid)
    except OSError as exc:  # pragma: no cover - pidfd exists since Linux 5.3
        popen.kill()
        popen.wait()
        raise SpawnError("spawn.launch_failed", f"pidfd_open failed: {exc}") from exc
    return LaunchedProcess(popen=popen, plan=plan, pidfd=pidfd)


def diagnose_privilege_drop(uid: int, gid: int, groups: Collection[int]) -> tuple[str, int] | None:
    """Which call of the privilege drop fails here: (its name, errno), or None.

    Only for the error path of a launch: subprocess reports an errno but not the step.
    A throwaway child forked here makes the same calls in the same order as subprocess
    does (``setgroups``, ``setregid``, ``setreuid``), writes which one failed to a pipe
    and exits at once; it execs nothing, imports nothing and returns to no caller, so
    forking a daemon with threads is harmless here.
    """
    steps = ("setgroups", "setregid", "setreuid")
    group_list = list(groups)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child; coverage does not follow os._exit
        answer = b"ok"
        try:
            os.close(read_end)
            for step in steps:
                try:
                    if step == "setgroups":
                        os.setgroups(group_list)
                    elif step == "setregid":
                        os.setregid(gid, gid)
                    else:
                        os.setreuid(uid, uid)
                except OSError as exc:
                    answer = f"{step} {exc.errno}".encode()
                    break
            os.write(write_end, answer)
        finally:
            os._exit(0)
    os.close(write_end)
    chunks = []
    try:
        while chunk := os.read(read_end, 256):
            chunks.append(chunk)
    finally:
        os.close(read_end)
        with contextlib.suppress(ChildProcessError):  # reaped by a SIGCHLD handler
            os.waitpid(pid, 0)
    step, _, number = b"".join(chunks).decode("ascii", "replace").partition(" ")
    if step in steps and number.isdigit():
        return step, int(number)
    return None


def _reap_if_of(pid: int, uid: int) -> None:
    """Reap ``pid`` if it is an exited child of this process running as ``uid`` (an
    adopted descendant of a user endpoint; never one of the daemon's own children)."""
    try:
        if os.stat(f"/proc/{pid}").st_uid != uid:
            return
        os.waitpid(pid, os.WNOHANG)
    except (OSError, ChildProcessError):
        return


def apply_limits(pid: int, plan: SpawnPlan) -> bool:
    """Set the plan's limits on ``pid`` from outside; False without CAP_SYS_RESOURCE
    (the user endpoint then relies on setting them itself, from its argv)."""
    for name, value in plan.limits.items():
        try:
            resource.prlimit(pid, getattr(resource, name), (value, value))
        except PermissionError:
            return False
        except ProcessLookupError:
            return False  # already gone: the registry notices through its pidfd
    return True


def session_members(sid: int) -> list[int]:
    """Pids of processes in session ``sid`` other than ``sid`` itself (zombies too)."""
    members: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:  # pragma: no cover - Linux always has /proc
        return members
    for entry in entries:
        if not entry.isdigit() or int(entry) == sid:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                raw = fh.read()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: fields start after the
        # last ')'. Then: state ppid pgrp session …
        fields = raw[raw.rfind(b")") + 2 :].split()
        if len(fields) > 3 and int(fields[3]) == sid:
            members.append(int(entry))
    return members


def kill_session(sid: int, *, deadline: float = 2.0, rounds: int = 8) -> list[int]:
    """SIGKILL every other process of session ``sid`` and reap those that are our children.

    Returns the pids still present at the end (unreapable zombies of another parent, or
    nothing). Bounded by ``rounds`` and ``deadline``.
    """
    end = time.monotonic() + deadline
    remaining: list[int] = []
    for _ in range(rounds):
        remaining = session_members(sid)
        if not remaining or time.monotonic() >= end:
            break
        fds: list[int] = []
        for pid in remaining:
            with contextlib.suppress(OSError):
                fds.append(os.pidfd_open(pid))
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        pending = set(fds)
        while pending and time.monotonic() < end:
            for fd, _ in poller.poll(max(1, int((end - time.monotonic()) * 1000))):
                pending.discard(fd)
                poller.unregister(fd)
        for fd in fds:
            os.close(fd)
        reaped_any = False
        for pid in remaining:
            try:
                got, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            reaped_any = reaped_any or got == pid
        if not reaped_any and not pending:
            # Everything left is dead but not ours to reap (or already gone).
            remaining = session_members(sid)
            if not remaining or all(_is_zombie_of_other(pid) for pid in remaining):
                break
    return remaining


def _is_zombie_of_other(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return True
    fields = raw[raw.rfind(b")") + 2 :].split()
    return fields[0] == b"Z" and int(fields[1]) != os.getpid()


def reap_adopted_orphans(keep: Collection[int] = ()) -> list[int]:
    """Reap zombie children this process adopted as a subreaper; returns their pids.

    Only zombies of *another uid* than ours and *another session* than ours are reaped,
    and never a pid in ``keep`` (the user endpoint leaders, whose exit status their
    ``LaunchedProcess`` collects). A descendant of a user endpoint runs as the user in
    the endpoint's session or one of its own (each endpoint starts a new session), while
    the daemon's own children — a mapping program run as the daemon, ``scancel`` or
    ``tail`` run as a user — stay in the daemon's session and must keep their exit status
    for whoever started them: reaping those here would make a failed program look like a
    success (or a successful one fail, as asyncio reports 255 for a child it lost).
    """
    me, my_uid, my_session = os.getpid(), os.getuid(), os.getsid(0)
    reaped: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:  # pragma: no cover - Linux always has /proc
        return reaped
    for entry in entries:
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid in keep:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                raw = fh.read()
            # state, ppid, pgrp, session: the fields after the command's closing paren
            fields = raw[raw.rfind(b")") + 2 :].split()
            if fields[0] != b"Z" or int(fields[1]) != me or int(fields[3]) == my_session:
                continue
            if os.stat(f"/proc/{entry}").st_uid == my_uid:
                continue
        except (OSError, IndexError, ValueError):
            continue
        with contextlib.suppress(ChildProcessError):
            got, _ = os.waitpid(pid, os.WNOHANG)
            if got == pid:
                reaped.append(pid)
    return reaped


def become_subreaper() -> bool:
    """Make this process the reaper of orphaned descendants (PR_SET_CHILD_SUBREAPER).

    Without it, workers of a user endpoint that died first are re-parented to PID 1,
    which in some containers never reaps them. Returns False when prctl is unavailable.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return False


@attrs.frozen
class StopOutcome:
    """How the ladder ended: ``exited`` (already gone), ``asked``, ``terminated``, ``killed``."""

    step: str
    returncode: int | None


async def stop_ladder(
    process: LaunchedProcess,
    *,
    ask: Callable[[], Awaitable[None] | None] | None,
    grace: float,
    kill_grace: float = 2.0,
) -> StopOutcome:
    """Ask, then SIGTERM the group, then SIGKILL it; reap. Each step waits ``grace``."""
    step = "exited"
    if not process.has_exited():
        step = "asked"
        exited = False
        if ask is not None:
            with contextlib.suppress(Exception):
                pending = ask()
                if pending is not None:
                    await asyncio.wait_for(pending, grace)
            exited = await process.wait_exit_async(grace)
        if not exited:
            step = "terminated"
            process.signal_group(signal.SIGTERM)
            if not await process.wait_exit_async(grace):
                step = "killed"
                process.signal_group(signal.SIGKILL)
                await process.wait_exit_async(kill_grace)
    returncode = await asyncio.to_thread(process.reap, deadline=kill_grace)
    return StopOutcome(step, returncode)


def stop_ladder_blocking(
    process: LaunchedProcess,
    *,
    ask: Callable[[], None] | None,
    grace: float,
    kill_grace: float = 2.0,
) -> StopOutcome:
    """The same ladder for callers without an event loop (tools, benchmarks).

    It runs ``stop_ladder`` in a private event loop of its own, so the steps are written
    once; it must therefore not be called from a thread whose event loop is running.
    """
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        return runner.run(stop_ladder(process, ask=ask, grace=grace, kill_grace=kill_grace))
