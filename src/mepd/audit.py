"""The audit log: JSON lines, one event per line, in a root-owned file of mode 0600.

The file is opened without following a symbolic link (``O_NOFOLLOW``) and refused,
after it is open, unless it is a regular file with one name owned by root (or the
daemon's own uid): in a directory someone else can write, a planted file or link must
never receive root's appends. Its directory is judged with every other file
(``mepd.trust``) at start and reload.

Each line is ``{"ts": <RFC 3339 UTC time>, "event": <name>, ...}``, ``ts`` in the
daemon log's format (``mepd.logs.rfc3339``). Events: authentication failures, mapping
results, authorization decisions (with the responsible policy line), user endpoint start
and stop, task received / started / finished. Many events can be written with one
``write`` system call (``record_many``) so that task events keep up with the task rate,
still one line per task.

If a write fails the log turns *unavailable* and raises ``AuditUnavailable``; the
daemon then refuses new work (503 ``audit.unavailable``) rather than continue blind.
Every later record tries again, so an operator who frees the disk restores service.
This module deliberately holds no policy about *which* events to record.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import attrs

from mepcore.errors import MepError
from mepd.logs import rfc3339


class AuditUnavailable(MepError):
    default_reason = "audit.unavailable"


class AuditSink(Protocol):
    """What the pipeline needs from an audit log (tests pass a failing one)."""

    @property
    def available(self) -> bool: ...

    def record(self, event: str, **fields: Any) -> None: ...

    def record_many(self, events: Iterable[tuple[str, Mapping[str, Any]]]) -> None: ...


_PLAIN = re.compile(r"[A-Za-z0-9_.:@+=-]{0,200}")


def _encoder() -> json.JSONEncoder:
    # One encoder per log: json.dumps with options would build a new one per line.
    return json.JSONEncoder(separators=(",", ":"), default=str)


def _refusal(path: Path, info: os.stat_result) -> str | None:
    """Why the opened file may not be the audit log (rule 8), judged on the open file
    itself (``fstat``), so nothing can be swapped in between: not a regular file, not
    owned by root or the daemon's uid (someone else's file in a shared directory), or
    with a second name (a hard link to another file root would then append to)."""
    mode = f"mode {stat.S_IMODE(info.st_mode):04o}"
    if not stat.S_ISREG(info.st_mode):
        return f"audit log {path} is not a regular file"
    if info.st_uid not in (0, os.geteuid()):
        return (
            f"audit log {path} (owner uid {info.st_uid}, {mode}) is not owned by root or the "
            "daemon's account (settings.untrusted_file)"
        )
    if info.st_nlink != 1:
        return (
            f"audit log {path} ({mode}) has {info.st_nlink} names (a hard link): refused "
            "(settings.untrusted_file)"
        )
    return None


@attrs.define
class AuditLog:
    """An append-only JSON-lines file. ``open()`` must be called before recording."""

    path: Path
    _encode: json.JSONEncoder = attrs.field(factory=_encoder, init=False)
    retry_interval: float = 1.0
    _fd: int | None = None
    _failed: bool = False
    _failed_at: float = 0.0

    def open(self) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, flags, 0o600)
        except OSError as exc:
            self._failed = True
            self._failed_at = time.monotonic()
            raise AuditUnavailable(detail=f"cannot open audit log {self.path}: {exc}") from exc
        info = os.fstat(fd)
        refusal = _refusal(self.path, info)
        if refusal:
            os.close(fd)
            self._failed = True
            self._failed_at = time.monotonic()
            raise AuditUnavailable(detail=refusal)
        if info.st_uid == os.geteuid():
            # The file may predate us with a laxer mode; the audit trail is root's only.
            os.fchmod(fd, 0o600)
        self._fd = fd
        self._failed = False

    @property
    def available(self) -> bool:
        """Whether records can be written. After a failure, at most once per
        ``retry_interval`` this reopens the file, so service resumes by itself once the
        cause (a full disk, a removed file) is gone; the next write proves it."""
        if self._failed and time.monotonic() - self._failed_at >= self.retry_interval:
            self._failed_at = time.monotonic()
            with contextlib.suppress(AuditUnavailable):
                self.reopen()
        return self._fd is not None and not self._failed

    def _line(self, event: str, fields: Mapping[str, Any], now: str) -> str:
        # Task events are most of the volume and their values are ids, hex digests,
        # POSIX names and reason codes: those are written without the JSON encoder
        # (a third of the cost). Anything else goes through the encoder.
        parts = [f'{{"ts":"{now}","event":"{event}"']
        for key, value in fields.items():
            if type(value) is str and _PLAIN.fullmatch(value):
                parts.append(f',"{key}":"{value}"')
            elif value is None:
                parts.append(f',"{key}":null')
            elif type(value) is int:
                parts.append(f',"{key}":{value}')
            else:
                return self._encode.encode({"ts": now, "event": event, **fields}) + "\n"
        parts.append("}\n")
        return "".join(parts)

    def record(self, event: str, **fields: Any) -> None:
        self._write(self._line(event, fields, rfc3339(time.time())).encode())

    def record_many(self, events: Iterable[tuple[str, Mapping[str, Any]]]) -> None:
        now = rfc3339(time.time())
        data = "".join([self._line(event, fields, now) for event, fields in events]).encode()
        if data:
            self._write(data)

    def _write(self, data: bytes) -> None:
        if self._fd is None:
            raise AuditUnavailable(detail="audit log is not open")
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as exc:
            self._failed = True
            self._failed_at = time.monotonic()
            raise AuditUnavailable(detail=f"cannot write audit log {self.path}: {exc}") from exc
        self._failed = False

    def reopen(self) -> None:
        """Reopen the file (after log rotation moved it away)."""
        self.close()
        self.open()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
