"""The guard of a Parsl engine's processes: ``python -I parsl_guard.py {interchange|block}``.

``interchange`` runs Parsl's interchange in the guard's process, killed (parent-death
signal, and a pidfd on the engine's process) when the engine's process dies. ``block``
runs a block's worker pool with a private TMPDIR, removed when the pool ends, and for a
local block kills the block's process group when the engine's process dies.
``process_start_time`` tells a process from a later one that reuses its pid.

This module is run by path (``GUARD``) and deliberately imports only the standard
library (and, in the interchange, Parsl's interchange module): no mepcore, no attrs, so a
block starts no slower. It neither builds nor scales anything: that is ``parsl_engine``.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["GUARD", "process_start_time"]


def process_start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks after boot, /proc/<pid>/stat), None if it is gone
    — a zombie is gone too (killed, not yet reaped by whoever inherited it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        if fields[0] in (b"Z", b"X"):
            return None
        return int(fields[19])
    except (IndexError, ValueError):
        return None


# -- the guard: python -I <this file> {interchange|block} (the standard library only) ----------

_PR_SET_PDEATHSIG = 1
GUARD = os.path.abspath(__file__)
_USAGE = (
    "usage: python -I parsl_guard.py interchange --watch PID:START\n"
    "       python -I parsl_guard.py block [--watch PID:START] -- COMMAND..."
)


def _parse_watch(value: str) -> tuple[int, int]:
    pid, _, start = value.partition(":")
    if not pid.isdigit() or not start.isdigit():
        raise SystemExit(_USAGE)
    return int(pid), int(start)


def _watch_owner(owner: tuple[int, int], on_gone: Callable[[], None]) -> None:
    """Call ``on_gone`` (in a daemon thread) as soon as the owner process is gone."""
    pid, start = owner
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        on_gone()
        return
    if process_start_time(pid) != start:  # the pid was reused: the owner is gone
        on_gone()
        return

    def watch() -> None:
        select.select([pidfd], [], [])
        on_gone()

    threading.Thread(target=watch, name="mep-owner-watch", daemon=True).start()


def _set_parent_death_signal() -> None:
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def _guard_interchange(owner: tuple[int, int]) -> int:
    """Run Parsl's interchange in this process, killed when its engine's process dies."""
    import runpy

    _set_parent_death_signal()
    if os.getppid() != owner[0]:
        return 1  # the engine died before the signal was armed
    _watch_owner(owner, lambda: os.kill(os.getpid(), signal.SIGKILL))
    runpy.run_module("parsl.executors.high_throughput.interchange", run_name="__main__")
    return 0


def _guard_block(command: list[str], owner: tuple[int, int] | None) -> int:
    """Run a block's worker pool with a private TMPDIR (multiprocessing leaves its
    ``pymp-*`` directories there), removed when the pool ends; for a local block, kill
    the block's process group when the engine's process dies."""
    import subprocess

    private = tempfile.mkdtemp(prefix="mepb-")
    # This is a process's entry point: its environment is its input, passed on.
    child = subprocess.Popen(command, env={**os.environ, "TMPDIR": private})

    def forward(signum: int, _frame: Any) -> None:
        with contextlib.suppress(OSError):
            child.send_signal(signum)
        # The pool is being stopped (scancel, walltime, the block's cancel): its
        # directory goes now, before a SIGKILL that may follow gives no other chance.
        shutil.rmtree(private, ignore_errors=True)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    if owner is not None:

        def owner_gone() -> None:
            shutil.rmtree(private, ignore_errors=True)
            os.killpg(os.getpgrp(), signal.SIGKILL)

        _watch_owner(owner, owner_gone)
    try:
        return child.wait()
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _guard_main(argv: Sequence[str]) -> int:
    args = list(argv)
    if not args or args[0] not in ("interchange", "block"):
        raise SystemExit(_USAGE)
    mode, rest = args[0], args[1:]
    command: list[str] = []
    if "--" in rest:
        at = rest.index("--")
        rest, command = rest[:at], rest[at + 1 :]
    owner = None
    if rest[:1] == ["--watch"] and len(rest) == 2:
        owner = _parse_watch(rest[1])
    elif rest:
        raise SystemExit(_USAGE)
    if mode == "interchange":
        if owner is None:
            raise SystemExit(_USAGE)
        return _guard_interchange(owner)
    if not command:
        raise SystemExit(_USAGE)
    return _guard_block(command, owner)


if __name__ == "__main__":
    # Run by path (``python -I <this file>``, see ``GUARD``), never as mepcore's module.
    sys.exit(_guard_main(sys.argv[1:]))
