"""The effects of the cgroup logic: ``CgroupPort``, and ``SystemCgroupPort`` on this machine.

``CgroupPort`` is everything ``mepcore.spawn.cgroup`` does to the world: files of the
cgroup filesystems, signals, waiting for processes and the clock, so that which
hierarchies are used, the order of the writes and the stop sequence are tested with an
in-memory fake. ``SystemCgroupPort`` is the real one: plain system calls.

This module deliberately decides nothing (which hierarchy, which limit, when to stop):
that is ``mepcore.spawn.cgroup``'s.
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from collections.abc import Collection
from typing import Protocol

__all__ = ["CgroupPort", "SystemCgroupPort"]


class CgroupPort(Protocol):
    """The effects the cgroup logic needs: files of the cgroup filesystems and signals."""

    def read(self, path: str) -> str:
        """The text of a file; raises OSError."""
        ...

    def write(self, path: str, text: str) -> None:
        """Write ``text`` to an existing file (cgroup files take one write); raises OSError."""
        ...

    def make_dir(self, path: str) -> bool:
        """Create one directory; False when it existed already. Raises OSError."""
        ...

    def remove_dir(self, path: str) -> None:
        """Remove one (cgroup) directory; raises OSError (EBUSY while it is populated)."""
        ...

    def child_dirs(self, path: str) -> list[str]:
        """Names of the directories in ``path`` (empty when it does not exist)."""
        ...

    def exists(self, path: str) -> bool: ...

    def writable(self, path: str) -> bool:
        """Could this process create entries in the directory ``path``?"""
        ...

    def kill(self, pid: int, sig: int) -> None:
        """Send ``sig``; a process that is gone already is not an error."""
        ...

    def alive(self, pid: int) -> bool: ...

    def wait_gone(self, pids: Collection[int], timeout: float) -> None:
        """Until every one of ``pids`` has exited, or ``timeout`` seconds."""
        ...

    def pause(self, seconds: float) -> None: ...

    def monotonic(self) -> float: ...


class SystemCgroupPort:
    """``CgroupPort`` on this machine's cgroup filesystems and processes."""

    def read(self, path: str) -> str:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.read()

    def write(self, path: str, text: str) -> None:
        # O_WRONLY without O_CREAT or O_TRUNC: a cgroup file exists, and one write is one
        # command to the kernel.
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def make_dir(self, path: str) -> bool:
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            return False
        return True

    def remove_dir(self, path: str) -> None:
        os.rmdir(path)

    def child_dirs(self, path: str) -> list[str]:
        try:
            with os.scandir(path) as entries:
                return [e.name for e in entries if e.is_dir(follow_symlinks=False)]
        except OSError:
            return []

    def exists(self, path: str) -> bool:
        return os.path.lexists(path)

    def writable(self, path: str) -> bool:
        return os.access(path, os.W_OK | os.X_OK)

    def kill(self, pid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def alive(self, pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def wait_gone(self, pids: Collection[int], timeout: float) -> None:
        fds: list[int] = []
        for pid in pids:
            with contextlib.suppress(OSError):
                fds.append(os.pidfd_open(pid))
        try:
            poller = select.poll()
            for fd in fds:
                poller.register(fd, select.POLLIN)
            pending = set(fds)
            end = time.monotonic() + timeout
            while pending and time.monotonic() < end:
                for fd, _ in poller.poll(max(1, int((end - time.monotonic()) * 1000))):
                    pending.discard(fd)
                    poller.unregister(fd)
        finally:
            for fd in fds:
                os.close(fd)

    def pause(self, seconds: float) -> None:
        # The freezer says "FREEZING" for a moment; there is no event to wait for in v1.
        time.sleep(seconds)

    def monotonic(self) -> float:
        return time.monotonic()
