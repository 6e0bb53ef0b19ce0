"""The user endpoint process (``python -m mepd.uep --channel-fd N``), run as the mapped user.

Order of events, each step a precondition of the next: prove the process cannot regain
root (else report ``spawn.privilege_drop`` and exit), arm the parent-death signal, lower
the resource limits, set no_new_privs (``--no-new-privs``), change to the home directory
(``--home=``; the launcher started the process in ``/`` because subprocess changes
directory while still root — if the account cannot enter its home, the process stays in
``/`` and says so on stderr), wait for the start message, render the endpoint
configuration as the user, run ``endpoint_setup``, start the executor, answer ``ready``,
serve task and control frames until stopped, drained, idle or orphaned, run
``endpoint_teardown``, send a final ``exiting`` frame with the reason. See docs/user-endpoints.md.

Deliberately lean at import: rendering and task machinery are imported only once a start
message asks for them. ``python -m mepd.uep`` runs ``main`` with the garbage collector
off (``mepd.uep.__main__``); the start turns it back on before the executor starts.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from mepd.channel import BlockingChannel

_USAGE = (
    "usage: python -m mepd.uep [--rlimit=RLIMIT_NAME=N ...] [--no-new-privs] [--keep-malloc]"
    " [--home=DIR]"
    " --channel-fd N"
)
_LIMIT_NAMES = frozenset({"RLIMIT_NPROC", "RLIMIT_NOFILE", "RLIMIT_AS", "RLIMIT_CORE"})


@attrs.frozen
class _Options:
    channel_fd: int
    limits: dict[str, int]
    no_new_privs: bool
    home: str | None
    keep_malloc: bool = False


def _parse(argv: Sequence[str]) -> _Options:
    args = list(argv)
    if len(args) < 2 or args[-2] != "--channel-fd" or not args[-1].isdigit():
        raise SystemExit(_USAGE)
    limits: dict[str, int] = {}
    no_new_privs, home, keep_malloc = False, None, False
    for arg in args[:-2]:
        if arg == "--no-new-privs":
            no_new_privs = True
            continue
        if arg == "--keep-malloc":
            keep_malloc = True
            continue
        if arg.startswith("--home=/"):
            home = arg.removeprefix("--home=")
            continue
        name, _, value = arg.removeprefix("--rlimit=").partition("=")
        if not arg.startswith("--rlimit=") or name not in _LIMIT_NAMES or not value.isdigit():
            raise SystemExit(_USAGE)
        limits[name] = int(value)
    return _Options(int(args[-1]), limits, no_new_privs, home, keep_malloc)


def _lower_limits(limits: dict[str, int]) -> str | None:
    import resource

    for name, value in limits.items():
        try:
            resource.setrlimit(getattr(resource, name), (value, value))
        except (OSError, ValueError) as exc:
            return f"{name}={value}: {exc}"
    return None


def _is_open(fd: int) -> bool:
    # The descriptor of the /proc listing itself is closed again by the time we ask.
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _refuse(channel: BlockingChannel, reason: str, detail: str) -> None:
    channel.send("error", {"reason": reason, "detail": detail, "error_class": "SpawnError"})


def _confine(channel: BlockingChannel, options: _Options, parent: int) -> int:
    """Everything before the start message, in order; 0, or the exit status of a refusal."""
    from mepd.uep.identity import (
        enter_home,
        privilege_problem,
        set_no_new_privs,
        set_parent_death_signal,
    )

    problem = privilege_problem()
    if problem is not None:
        _refuse(channel, "spawn.privilege_drop", f"the user endpoint could regain root: {problem}")
        return 3
    if not set_parent_death_signal(parent):
        return 4
    # Before anything of the user's can run (the launcher may lack CAP_SYS_RESOURCE).
    failed = _lower_limits(options.limits)
    if failed is not None:
        _refuse(channel, "spawn.launch_failed", f"could not set resource limit {failed}")
        return 5
    if options.no_new_privs and not set_no_new_privs():
        _refuse(channel, "spawn.privilege_drop", "could not set no_new_privs (PR_SET_NO_NEW_PRIVS)")
        return 6
    if options.home is not None:
        # As the account now: a home it cannot enter (unreadable, or a link into a
        # root-only directory) leaves the process in "/", never somewhere root chose.
        problem = enter_home(options.home)
        if problem is not None:
            sys.stderr.write(f"mepd.uep: staying in /: {problem}\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    # What this process was handed, before it opens anything itself (the engine's pipes
    # and the like come later): introspection reports it as ``inherited_fds``.
    inherited = [fd for fd in sorted(map(int, os.listdir("/proc/self/fd"))) if _is_open(fd)]
    parent = os.getppid()
    options = _parse(sys.argv[1:] if argv is None else argv)
    fd = options.channel_fd
    # Children (setup scripts, workers) must not inherit the channel: its end-of-file is
    # how the daemon learns this process is gone.
    os.set_inheritable(fd, False)
    sock = socket.socket(fileno=fd)

    from mepd.channel import BlockingChannel

    channel = BlockingChannel(sock)
    refused = _confine(channel, options, parent)
    if refused:
        return refused

    if not options.keep_malloc:
        from mepd.malloc import pin_thresholds

        pin_thresholds()  # before the engine forks its workers: they inherit it
    from mepd.uep.server import UserEndpoint

    return UserEndpoint(channel=channel, channel_fd=fd, inherited_fds=inherited).run()
