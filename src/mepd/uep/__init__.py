"""The user endpoint process (``python -m mepd.uep --channel-fd N``), run as the mapped user.

Order of events, each step a precondition of the next: prove the process cannot regain
root (else report ``spawn.privilege_drop`` and exit), arm the parent-death signal, wait
for the start message, render the endpoint configuration as the user, run
``endpoint_setup``, start the executor, answer ``ready``, serve task and control frames
until stopped, drained, idle or orphaned, run ``endpoint_teardown``, send a final
``exiting`` frame with the reason. See docs/user-endpoints.md.

Deliberately lean at import: rendering and task machinery are imported only once a start
message asks for them.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Sequence

_USAGE = "usage: python -m mepd.uep [--rlimit=RLIMIT_NAME=N ...] --channel-fd N"
_LIMIT_NAMES = frozenset({"RLIMIT_NPROC", "RLIMIT_NOFILE", "RLIMIT_AS", "RLIMIT_CORE"})


def _parse(argv: Sequence[str]) -> tuple[int, dict[str, int]]:
    args = list(argv)
    if len(args) < 2 or args[-2] != "--channel-fd" or not args[-1].isdigit():
        raise SystemExit(_USAGE)
    limits: dict[str, int] = {}
    for arg in args[:-2]:
        name, _, value = arg.removeprefix("--rlimit=").partition("=")
        if not arg.startswith("--rlimit=") or name not in _LIMIT_NAMES or not value.isdigit():
            raise SystemExit(_USAGE)
        limits[name] = int(value)
    return int(args[-1]), limits


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


def main(argv: Sequence[str] | None = None) -> int:
    # What this process was handed, before it opens anything itself (the engine's pipes
    # and the like come later): introspection reports it as ``inherited_fds``.
    inherited = [fd for fd in sorted(map(int, os.listdir("/proc/self/fd"))) if _is_open(fd)]
    parent = os.getppid()
    fd, limits = _parse(sys.argv[1:] if argv is None else argv)
    # Children (setup scripts, workers) must not inherit the channel: its end-of-file is
    # how the daemon learns this process is gone.
    os.set_inheritable(fd, False)
    sock = socket.socket(fileno=fd)

    from mepd.channel import BlockingChannel
    from mepd.uep.identity import privilege_problem, set_parent_death_signal

    channel = BlockingChannel(sock)
    problem = privilege_problem()
    if problem is not None:
        channel.send(
            "error",
            {
                "reason": "spawn.privilege_drop",
                "detail": f"the user endpoint could regain root: {problem}",
                "error_class": "SpawnError",
            },
        )
        return 3
    if not set_parent_death_signal(parent):
        return 4
    # Before anything of the user's can run (the launcher may lack CAP_SYS_RESOURCE).
    failed = _lower_limits(limits)
    if failed is not None:
        channel.send(
            "error",
            {
                "reason": "spawn.launch_failed",
                "detail": f"could not set resource limit {failed}",
                "error_class": "SpawnError",
            },
        )
        return 5

    from mepd.uep.server import UserEndpoint

    return UserEndpoint(channel=channel, channel_fd=fd, inherited_fds=inherited).run()
