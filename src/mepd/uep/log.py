"""The user endpoint's own log: written as the user, into the user's directory.

``~/.mep/endpoints/<endpoint>/endpoint.log`` (``log_path``), the counterpart of Globus
Compute's ``~/.globus_compute/uep.<ids>/endpoint.log``. One directory per endpoint
*name*, because that is what the user knows (``mep logs hpc``) and what the daemon can
find again without asking anyone; the user endpoints of several configurations of one
endpoint share the file and each line says which one wrote it (pid, config key).
Next to it, ``~/.mep/run/<endpoint>`` holds Parsl run directories.

What goes in: the start (and the account, engine, pid), ``endpoint_setup`` and
``endpoint_teardown`` output, every start failure with its reason, engine events
(blocks refused or lost), and whatever the process and its children write to stdout
and stderr (Parsl's warnings, tracebacks, workers' prints): descriptors 1 and 2 are a
pipe read by one thread that writes lines here (and on to the original stderr).
Rotated by the standard library's ``RotatingFileHandler``: ``MAX_BYTES`` per file,
``BACKUPS`` old files (at most 4 MiB per endpoint name). Directory 0700, files 0600.

Deliberately not here: reading the log for the daemon (``mepd.userlog`` does that as
the user, never as root).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import logging.handlers
import os
import re
import sys
import threading
import time
from typing import IO

LOG_NAME = "endpoint.log"
MAX_BYTES = 1024 * 1024
BACKUPS = 3
TAIL_LINES = 15
_MAX_LINE = 2000


def directory_name(endpoint: str) -> str:
    """The endpoint's name as one safe path component."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", endpoint)[:64].lstrip(".") or "endpoint"


def log_path(home: str, endpoint: str) -> str:
    """Where the user endpoints of ``endpoint`` log, in a home directory."""
    return os.path.join(home, ".mep", "endpoints", directory_name(endpoint), LOG_NAME)


class _UtcFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"


class EndpointLog:
    """The open log of one user endpoint process (thread-safe)."""

    def __init__(self, path: str, tag: str) -> None:
        self.path = path
        self._logger = logging.Logger(f"mep.uep.{tag}")
        self._logger.propagate = False
        self._handler: logging.Handler | None = None
        self._tag = tag
        self._reader: threading.Thread | None = None
        self._saved_stderr = -1

    @classmethod
    def open(cls, home: str, endpoint: str, tag: str) -> EndpointLog:
        """Create the directory (0700) and the file (0600); a log that cannot be opened
        writes nowhere, and says so on stderr."""
        log = cls(log_path(home, endpoint), tag)
        try:
            os.makedirs(os.path.dirname(log.path), mode=0o700, exist_ok=True)
            fd = os.open(log.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            os.close(fd)
            handler = logging.handlers.RotatingFileHandler(
                log.path, maxBytes=MAX_BYTES, backupCount=BACKUPS, encoding="utf-8"
            )
        except OSError as exc:
            os.write(2, f"mepd.uep: no endpoint log at {log.path}: {exc}\n".encode())
            return log
        handler.setFormatter(_UtcFormatter("%(asctime)s %(message)s"))
        log._handler = handler
        log._logger.addHandler(handler)
        return log

    def write(self, event: str, text: str = "") -> None:
        """One line per line of ``text``, each ``<time> <tag> <event>: <line>``."""
        lines = text.splitlines() or [""]
        for line in lines:
            self._logger.warning("%s %s: %s", self._tag, event, line[:_MAX_LINE])

    def capture_stdio(self) -> None:
        """Point descriptors 1 and 2 (this process's and its children's) at the log."""
        if self._handler is None or self._reader is not None:
            return
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        self._saved_stderr = os.dup(2)
        os.set_inheritable(self._saved_stderr, False)
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        os.close(write_end)
        # A print reaches the log when its line ends, not when the process exits.
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(AttributeError, ValueError):
                stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        self._reader = threading.Thread(
            target=self._pump, args=(read_end,), name="uep-log", daemon=True
        )
        self._reader.start()

    def _pump(self, fd: int) -> None:
        with open(fd, "rb", buffering=0) as stream:
            for raw in iter(stream.readline, b""):
                with contextlib.suppress(OSError):
                    os.write(self._saved_stderr, raw)
                self.write("output", raw.decode("utf-8", "replace").rstrip("\n"))

    def release_stdio(self, timeout: float = 2.0) -> None:
        """Stop capturing (at exit): what was written so far reaches the file."""
        if self._reader is None:
            return
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(self._saved_stderr, 2)
            os.dup2(devnull, 1)
            os.close(devnull)
        # Children that still hold the pipe keep the reader going; it is a daemon.
        self._reader.join(timeout)

    def tail(self, lines: int = TAIL_LINES) -> list[str]:
        """The last lines of the file (as this process, the user, reads it)."""
        if self._handler is not None:
            self._handler.flush()
        return read_tail(self.path, lines)


def read_tail(path: str, lines: int, max_bytes: int = 256 * 1024) -> list[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read(max_bytes)
    except OSError:
        return []
    text = data.decode("utf-8", "replace").splitlines()
    if size > max_bytes and text:
        text = text[1:]  # the first line is cut
    return [line[:_MAX_LINE] for line in text[-lines:]] if lines > 0 else []


def run_logged_script(
    name: str, script: str, *, timeout: float, cwd: str, log: EndpointLog | None
) -> tuple[int | None, list[str]]:
    """Run ``endpoint_setup``/``endpoint_teardown`` with ``/bin/sh -c`` as this account,
    its stdout and stderr (merged) going to the log line by line.

    Returns its exit status (None when it ran out of time: its process group is then
    killed) and its last ``TAIL_LINES`` lines. It stays in our session so the daemon's
    reaper finds anything it leaves."""
    # Here, not at the top: most endpoints have no setup or teardown script, and a
    # start does not pay for subprocess.
    import subprocess

    proc = subprocess.Popen(
        ["/bin/sh", "-c", script],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        process_group=0,
        close_fds=True,
    )
    last: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    assert proc.stdout is not None
    reader = threading.Thread(
        target=_collect, args=(proc.stdout, name, log, last), name=f"uep-{name}", daemon=True
    )
    reader.start()
    status: int | None
    try:
        status = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait()
        status = None
    # A background child may hold the pipe open: its output is not waited for.
    reader.join(2.0)
    return status, list(last)


def _collect(
    stream: IO[bytes], name: str, log: EndpointLog | None, last: collections.deque[str]
) -> None:
    for raw in stream:
        line = raw.decode("utf-8", "replace").rstrip("\n")[:_MAX_LINE]
        last.append(line)
        if log is not None:
            log.write(name, line)
