"""Running an external identity-mapping program, bounded in time and output.

``SubprocessCommandRunner`` starts the program in a new session (its own process
group) with a clean environment and ``/`` as working directory, feeds it stdin, reads
stdout and stderr incrementally up to a cap, and on a timeout or an over-long answer
kills the *whole process group*, so a mapper that forked helpers leaves nothing behind.
When the program exits normally its process group is killed too before the program is
reaped (the group id cannot be reused while the zombie leader holds it).

It deliberately does not interpret the program's answer (``external`` does that), does
not change user (the program runs as the daemon does, as with Globus Connect Server),
and cannot catch descendants that leave the process group with ``setsid``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import IO, Protocol, runtime_checkable

import attrs

from mepcore.errors import IdentityError

# PATH only: the mapper gets nothing of the daemon's environment (tokens, secrets,
# LD_PRELOAD…). An administrator who needs more passes ``env`` explicitly.
DEFAULT_ENV: Mapping[str, str] = MappingProxyType(
    {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}
)
DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_OUTPUT = 1024 * 1024
STDERR_KEEP = 4096
_CHUNK = 65536


def _freeze_env(value: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(value))


@attrs.frozen
class CommandOutput:
    """What a finished program produced (stdout whole, stderr only its first bytes)."""

    returncode: int
    stdout: bytes
    stderr: bytes = b""


@runtime_checkable
class CommandRunner(Protocol):
    """Runs one program to completion.

    Raises ``IdentityError`` with reason ``identity.mapper_timeout`` when it runs longer
    than ``timeout`` seconds, ``identity.mapper_output_too_large`` when stdout exceeds
    ``max_output`` bytes, and ``identity.mapper_failed`` when it cannot be started.
    A non-zero exit status is *returned*, not raised.
    """

    def run(
        self, argv: Sequence[str], stdin: bytes, *, timeout: float, max_output: int
    ) -> CommandOutput: ...


@attrs.frozen
class SubprocessCommandRunner:
    """The real runner: ``subprocess.Popen`` in a new session, bounded, always reaped."""

    env: Mapping[str, str] = attrs.field(converter=_freeze_env, default=DEFAULT_ENV)
    cwd: str = "/"

    def run(
        self, argv: Sequence[str], stdin: bytes, *, timeout: float, max_output: int
    ) -> CommandOutput:
        command = list(argv)
        try:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=dict(self.env),
                cwd=self.cwd,
                close_fds=True,
                start_new_session=True,
            )
        except OSError as exc:
            raise IdentityError(
                "identity.mapper_failed",
                f"mapping program {command[0]!r} could not be started: {exc.strerror or exc}",
                context={"command": command},
            ) from exc
        try:
            return _communicate(proc, command, stdin, timeout=timeout, max_output=max_output)
        finally:
            _kill_group_and_reap(proc)


def _communicate(
    proc: subprocess.Popen[bytes],
    command: list[str],
    stdin: bytes,
    *,
    timeout: float,
    max_output: int,
) -> CommandOutput:
    if proc.stdin is None or proc.stdout is None or proc.stderr is None:
        raise TypeError("the mapping program must be started with three pipes")
    exchange = _Exchange(proc, proc.stdin, proc.stdout, command, stdin, max_output)
    deadline = time.monotonic() + timeout
    pidfd = os.pidfd_open(proc.pid)
    with selectors.DefaultSelector() as sel, contextlib.closing(_Fd(pidfd)):
        exchange.register(sel, proc.stderr, pidfd)
        # Done when the program has exited and both pipes reached end of file; a
        # descendant that left the group and holds the pipes is covered by the deadline.
        while not (exchange.exited and not sel.get_map()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise IdentityError(
                    "identity.mapper_timeout",
                    f"mapping program {command[0]!r} did not finish within {timeout:g}s;"
                    " its process group was killed",
                    context={"command": command, "stderr": exchange.stderr_text()},
                )
            for key, _ in sel.select(remaining):
                exchange.on_ready(sel, key, pidfd)
    # The program has exited (pidfd readable) but is not reaped yet: waitid with
    # WNOWAIT reads its status and leaves the zombie so the group id stays ours.
    status = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    return CommandOutput(
        returncode=_returncode(status), stdout=bytes(exchange.stdout), stderr=bytes(exchange.stderr)
    )


@attrs.define
class _Exchange:
    """The pipes of one run of a mapping program: what is left to write, what was read."""

    proc: subprocess.Popen[bytes]
    stdin: IO[bytes]
    stdout_pipe: IO[bytes]
    command: list[str]
    pending: memoryview = attrs.field(converter=memoryview)
    max_output: int
    stdout: bytearray = attrs.field(factory=bytearray)
    stderr: bytearray = attrs.field(factory=bytearray)
    exited: bool = False

    def register(self, sel: selectors.BaseSelector, stderr: IO[bytes], pidfd: int) -> None:
        for stream in (self.stdin, self.stdout_pipe, stderr):
            os.set_blocking(stream.fileno(), False)
        if self.pending:
            sel.register(self.stdin, selectors.EVENT_WRITE)
        else:
            self.stdin.close()
        sel.register(self.stdout_pipe, selectors.EVENT_READ)
        sel.register(stderr, selectors.EVENT_READ)
        sel.register(pidfd, selectors.EVENT_READ)

    def stderr_text(self) -> str:
        return bytes(self.stderr).decode(errors="replace")

    def on_ready(self, sel: selectors.BaseSelector, key: selectors.SelectorKey, pidfd: int) -> None:
        if key.fileobj is self.stdin:
            self._write(sel)
        elif key.fileobj == pidfd:
            sel.unregister(pidfd)
            self.exited = True
            # Helpers it left behind would hold the pipes open; the leader is an
            # unreaped zombie now, so the group id is still ours to kill.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        else:
            self._read(sel, key)

    def _write(self, sel: selectors.BaseSelector) -> None:
        try:
            written = os.write(self.stdin.fileno(), self.pending[:_CHUNK])
        except BrokenPipeError:
            written = len(self.pending)  # the program does not want the rest
        except BlockingIOError:
            written = 0
        self.pending = self.pending[written:]
        if not self.pending:
            sel.unregister(self.stdin)
            self.stdin.close()

    def _read(self, sel: selectors.BaseSelector, key: selectors.SelectorKey) -> None:
        try:
            chunk = os.read(key.fd, _CHUNK)
        except BlockingIOError:
            return
        if not chunk:
            sel.unregister(key.fileobj)
        elif key.fileobj is self.stdout_pipe:
            self.stdout += chunk
            if len(self.stdout) > self.max_output:
                raise IdentityError(
                    "identity.mapper_output_too_large",
                    f"mapping program {self.command[0]!r} wrote more than"
                    f" {self.max_output} bytes; its process group was killed",
                    context={"command": self.command},
                )
        elif len(self.stderr) < STDERR_KEEP:
            self.stderr += chunk[: STDERR_KEEP - len(self.stderr)]


def _returncode(status: os.waitid_result | None) -> int:
    if status is None:  # pragma: no cover - WNOHANG is not used
        return -1
    if status.si_code == os.CLD_EXITED:
        return status.si_status
    return -status.si_status


class _Fd:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        os.close(self.fd)


def _kill_group_and_reap(proc: subprocess.Popen[bytes]) -> None:
    """Kill every process of the program's group, then reap the program.

    Called while the leader is unreaped (running or a zombie), so ``proc.pid`` still
    names our group and cannot have been reused by an unrelated process.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    try:
        proc.wait()
    except OSError as exc:  # pragma: no cover - ECHILD if someone else reaped it
        if exc.errno != errno.ECHILD:
            raise
