"""Shell commands and MPI applications as functions: ``ShellFunction``, ``MPIFunction``.

A ``ShellFunction`` is a command template; submitting it (``Executor.submit(fn,
name=value, …)`` or ``map``) runs the command on the endpoint, as the mapped account, in
a new session under ``/bin/bash -c``. ``{name}`` fields are filled from the keyword
arguments (or, in order, from positional ones), each value shell-quoted
(``shlex.quote``), so a value is always one word and never more shell. The result is a
``ShellResult``: the return code and the *tails* of stdout and stderr (at most
``max_output_bytes`` each, the rest dropped and flagged), so that the result fits the
endpoint's result limit (10 MiB unless the administrator set another; a larger result
fails with ``task.result_too_large``). A command that runs longer than ``walltime``
seconds has its whole process group killed and reports return code 124, as
``timeout(1)`` does. Nothing of a command outlives its task: what its group left
running when bash returns is killed, and so is the group when the process running the
task dies (a cancel, the end of the endpoint), through a small supervisor process.

A failing command is a result, not an exception: its return code is in the
``ShellResult``. With ``check=True`` a non-zero code raises
``subprocess.CalledProcessError`` on the endpoint instead, which the future raises as a
``RemoteException``.

``MPIFunction`` is a ``ShellFunction`` whose command runs under the MPI launcher the
endpoint's ``GlobusMPIEngine`` chose for the task: ``$PARSL_MPI_PREFIX`` (``mpiexec -n …
-ppn … -hosts …``, ``srun --ntasks …`` or ``aprun -n …``, from the task's
``resource_specification``) is put in front of it.

This module runs on both sides: the client builds and sends these objects (dill pickles
them by reference to this module), the endpoint calls them. It deliberately uses the
standard library only.
"""

from __future__ import annotations

import os
import shlex
import string
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from typing import IO, Any

import attrs

__all__ = ["MPIFunction", "ShellFunction", "ShellResult"]

DEFAULT_MAX_OUTPUT_BYTES = 1024 * 1024
TIMEOUT_RETURNCODE = 124
# How long a killed command's group gets to go after SIGTERM, before SIGKILL.
_KILL_GRACE = 5.0


@attrs.frozen
class ShellResult:
    """What a shell command did: its command line, return code and output tails."""

    cmd: str
    returncode: int
    stdout: str
    stderr: str
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _fields(template: str) -> list[str]:
    names = []
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(
                f"command field {{{name}}}: fields are plain names like {{input}} "
                "(no positions, attributes, conversions or format specs)"
            )
        names.append(name)
    return names


def _tail(fh: IO[bytes], limit: int) -> tuple[str, bool]:
    size = fh.seek(0, os.SEEK_END)
    fh.seek(max(0, size - limit))
    data = fh.read(limit)
    return data.decode("utf-8", errors="replace"), size > limit


# The command runs under this small supervisor (``python -I -c``), a child of the
# process that runs the task: bash starts in a process group of its own, so that the
# whole command — background jobs, an MPI launcher's ranks — can be stopped together; and
# the supervisor dies with its parent (PR_SET_PDEATHSIG: a worker killed by a cancel, or
# by the end of its endpoint), taking that group with it. Once bash is done, what is left
# of its group goes too: a task leaves nothing running (DESIGN.md §3.10).
_SUPERVISOR = r"""
import ctypes, os, signal, subprocess, sys, time

command, parent, grace = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
child = []


def group_alive(group):
    try:
        os.waitpid(group, os.WNOHANG)  # bash itself, if it is done
    except ChildProcessError:
        pass
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def stop_group(signum=signal.SIGTERM, frame=None):
    # Not Popen.wait: the main code is inside it, holding its lock.
    if child:
        group, end = child[0].pid, time.monotonic() + grace
        try:
            os.killpg(group, signal.SIGTERM)
            while group_alive(group) and time.monotonic() < end:
                time.sleep(0.02)
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os._exit(128 + signum)


signal.signal(signal.SIGTERM, stop_group)
ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
if os.getppid() != parent:
    os._exit(137)  # the task's process is gone already
child.append(subprocess.Popen(["/bin/bash", "-c", command], start_new_session=True))
code = child[0].wait()
try:
    os.killpg(child[0].pid, signal.SIGKILL)
except ProcessLookupError:
    pass
sys.exit(code if code >= 0 else 128 - code)
"""


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the supervisor, which stops the command's group (SIGTERM, then SIGKILL)."""
    process.terminate()
    try:
        process.wait(_KILL_GRACE + 5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class ShellFunction:
    """A shell command template run on the endpoint; see the module docstring.

    ``cmd`` is the template (``"wc -l {path}"``); ``walltime`` (seconds) bounds one run;
    ``max_output_bytes`` bounds each of stdout and stderr in the result (the tail is
    kept); ``check`` raises ``subprocess.CalledProcessError`` on a non-zero return code
    instead of returning it; ``name`` is how the function is registered (default: the
    class name)."""

    def __init__(
        self,
        cmd: str,
        *,
        walltime: float | None = None,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
        check: bool = False,
        name: str | None = None,
    ) -> None:
        if not isinstance(cmd, str) or not cmd.strip():
            raise ValueError("cmd must be a non-empty command line")
        if walltime is not None and not walltime > 0:
            raise ValueError("walltime must be a positive number of seconds")
        if max_output_bytes < 1:
            raise ValueError("max_output_bytes must be positive")
        self.cmd = cmd
        self.fields = tuple(dict.fromkeys(_fields(cmd)))
        self.walltime = walltime
        self.max_output_bytes = max_output_bytes
        self.check = check
        self.__name__ = name or type(self).__name__

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.cmd!r})"

    def command(self, *args: Any, **kwargs: Any) -> str:
        """The command line for these arguments (each value shell-quoted); positional
        arguments fill the fields in the order they first appear (so ``map`` works)."""
        if len(args) > len(self.fields):
            raise TypeError(f"{self.__name__}: {len(args)} arguments for {self.cmd!r}")
        for field, value in zip(self.fields, args, strict=False):
            if field in kwargs:
                raise TypeError(f"{self.__name__}: {field} given twice")
            kwargs[field] = value
        missing = [f for f in self.fields if f not in kwargs]
        if missing:
            raise TypeError(f"{self.__name__}: missing arguments {missing} for {self.cmd!r}")
        extra = sorted(set(kwargs) - set(self.fields))
        if extra:
            raise TypeError(f"{self.__name__}: unexpected arguments {extra} for {self.cmd!r}")
        return self.cmd.format(**{k: shlex.quote(str(v)) for k, v in kwargs.items()})

    def __call__(self, *args: Any, **kwargs: Any) -> ShellResult:
        return self.run(self.command(*args, **kwargs))

    def run(self, command: str, env: Mapping[str, str] | None = None) -> ShellResult:
        """Run a finished command line (here, in this process's environment)."""
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            # The caller's own command, run as the caller (the endpoint's account).
            supervisor = [sys.executable, "-I", "-c", _SUPERVISOR]
            process = subprocess.Popen(
                [*supervisor, command, str(os.getpid()), str(_KILL_GRACE)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=None if env is None else dict(env),
            )
            timed_out = False
            try:
                returncode = process.wait(self.walltime)
            except subprocess.TimeoutExpired:
                _stop(process)
                timed_out, returncode = True, TIMEOUT_RETURNCODE
            except BaseException:  # an alarm or interrupt of the task: leave nothing behind
                _stop(process)
                raise
            stdout, stdout_cut = _tail(out, self.max_output_bytes)
            stderr, stderr_cut = _tail(err, self.max_output_bytes)
        if self.check and returncode != 0:
            raise subprocess.CalledProcessError(returncode, command, stdout, stderr)
        return ShellResult(command, returncode, stdout, stderr, stdout_cut, stderr_cut, timed_out)


class MPIFunction(ShellFunction):
    """A ``ShellFunction`` run under the endpoint's MPI launcher: ``$PARSL_MPI_PREFIX``
    goes in front of the command. Submit it to an endpoint whose engine is
    ``GlobusMPIEngine``, with a ``resource_specification`` (``num_nodes``,
    ``ranks_per_node``, ``num_ranks``, ``launcher_options``) on the ``Executor``."""

    def command(self, *args: Any, **kwargs: Any) -> str:
        return "$PARSL_MPI_PREFIX " + super().command(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> ShellResult:
        if not os.environ.get("PARSL_MPI_PREFIX"):
            raise RuntimeError(
                "MPIFunction needs an endpoint whose engine is GlobusMPIEngine "
                "(no MPI launcher was set up for this task)"
            )
        return super().__call__(*args, **kwargs)
