"""The user endpoint's view of its own process identity.

``privilege_problem()`` is the first thing the user endpoint runs: it proves the process
cannot regain root (``setuid(0)`` must fail with ``PermissionError``, no capability may
be permitted, effective or ambient). ``set_parent_death_signal()`` asks the kernel to
kill the process when the daemon dies; it must run *after* the drop because the kernel
clears that setting whenever credentials change. ``set_no_new_privs()`` makes execve
grant no privilege from then on (setuid bits and file capabilities are ignored), for
this process and everything it starts. ``enter_home()`` changes to the home directory
*as the account* (the launcher starts the process in ``/``: subprocess would change
directory while still root). ``introspect()`` reports the identity for admin tools and
tests. Nothing here changes credentials: the launcher did the drop.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
from collections.abc import Sequence
from typing import Any

_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_PR_GET_NO_NEW_PRIVS = 39
_CAP_FIELDS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
_RLIMITS = ("RLIMIT_NPROC", "RLIMIT_NOFILE", "RLIMIT_AS", "RLIMIT_CORE", "RLIMIT_CPU")


def proc_status() -> dict[str, str]:
    """``/proc/self/status`` as a mapping of field to raw value."""
    fields: dict[str, str] = {}
    with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def privilege_problem() -> str | None:
    """Why this process could regain root, or None when it provably cannot."""
    if os.getuid() == 0 or os.geteuid() == 0 or os.getgid() == 0 or os.getegid() == 0:
        return "running with uid or gid 0"
    if 0 in os.getgroups():
        return "member of group 0"
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:  # pragma: no cover - only reachable when the drop did not happen
        return "setuid(0) succeeded"
    status = proc_status()
    for name in ("CapPrm", "CapEff", "CapAmb"):
        value = status.get(name)
        if value is None or int(value, 16) != 0:
            return f"{name} is {value}"
    return None


def set_parent_death_signal(expected_parent: int) -> bool:
    """SIGKILL this process when the daemon dies. False if the daemon is already gone."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        return False
    # The parent may have died between fork and prctl: then nobody will signal us.
    return os.getppid() == expected_parent


def set_no_new_privs() -> bool:
    """PR_SET_NO_NEW_PRIVS on this process (irreversible, inherited); True once it is set."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return False
    return int(libc.prctl(_PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0)) == 1


def enter_home(home: str) -> str | None:
    """Change to ``home`` as this (unprivileged) process; why not, or None when done.

    On failure the process stays where it is (``/``, where the launcher started it).
    """
    try:
        os.chdir(home)
    except OSError as exc:
        return f"cannot enter the home directory {home}: {exc.strerror or exc}"
    return None


def open_fds() -> list[dict[str, Any]]:
    """Open descriptors with what they point at (the listing's own descriptor excluded)."""
    out: list[dict[str, Any]] = []
    for name in sorted(os.listdir("/proc/self/fd"), key=int):
        fd = int(name)
        try:
            os.fstat(fd)  # the descriptor of the listing itself is closed by now
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        out.append({"fd": fd, "target": target})
    return out


def _own_cgroups() -> list[str]:
    """This process's lines of ``/proc/self/cgroup`` (``hierarchy:controllers:path``)."""
    try:
        with open("/proc/self/cgroup", encoding="ascii", errors="replace") as fh:
            return [line.strip() for line in fh if line.strip()]
    except OSError:
        return []


def introspect(*, channel_fd: int, inherited_fds: Sequence[int] = ()) -> dict[str, Any]:
    """The process identity, as the ``introspect`` answer carries it."""
    status = proc_status()
    rlimits: dict[str, list[int]] = {}
    for name in _RLIMITS:
        soft, hard = resource.getrlimit(getattr(resource, name))
        rlimits[name] = [soft, hard]
    caps = {name: status.get(name, "") for name in _CAP_FIELDS}
    setuid_refused = False
    with contextlib.suppress(PermissionError):
        os.setuid(0)
    if os.geteuid() != 0:
        setuid_refused = True
    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "uid": os.getuid(),
        "euid": os.geteuid(),
        "gid": os.getgid(),
        "egid": os.getegid(),
        "groups": sorted(os.getgroups()),
        "umask": int(status.get("Umask", "0"), 8),
        "cwd": os.getcwd(),
        "env_keys": sorted(os.environ),
        "fds": open_fds(),
        "channel_fd": channel_fd,
        "inherited_fds": list(inherited_fds),
        "sid": os.getsid(0),
        "pgid": os.getpgid(0),
        "rlimits": rlimits,
        "capabilities": caps,
        "no_new_privs": status.get("NoNewPrivs") == "1",
        "cgroups": _own_cgroups(),
        "setuid_refused": setuid_refused,
    }
