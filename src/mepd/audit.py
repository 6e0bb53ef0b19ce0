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

A record made while a request is served carries that request's ``request_id`` (the
``X-Request-ID`` of its answer; ``mepd.logs.current_request_id``). Values are capped:
a string longer than ``MAX_FIELD_CHARS`` is cut with a marker saying how much was left
out, a list longer than ``MAX_LIST_ITEMS`` keeps its first items and a marker, so a
5,000-character identity or a crafted claim cannot make one record huge.

Each record is written whole or not at all: if a write fails part-way (``ENOSPC``,
``EFBIG`` past ``RLIMIT_FSIZE``, an I/O error), the file is cut back to where that write
began (a ``record_many`` batch is all or nothing, as the caller sees it: it gets the
error), so it always ends in a newline and the next record starts a line of its own.
The log then turns *unavailable* and raises ``AuditUnavailable``; the daemon refuses
new work (503 ``audit.unavailable``) rather than continue blind.
Every later record tries again, so an operator who frees the disk restores service.
This module deliberately holds no policy about *which* events to record.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import attrs

from mepcore.errors import MepError
from mepd.logs import cap_text, current_request_id, rfc3339

MAX_FIELD_CHARS = 1024
MAX_LIST_ITEMS = 100


class AuditUnavailable(MepError):
    default_reason = "audit.unavailable"


class AuditSink(Protocol):
    """What the pipeline needs from an audit log (tests pass a failing one)."""

    @property
    def available(self) -> bool: ...

    def record(self, event: str, **fields: Any) -> None: ...

    def record_many(self, events: Iterable[tuple[str, Mapping[str, Any]]]) -> None: ...


MAX_KEY_CHARS = 128
# What the encoder writes for a string (ASCII, escaped): the C function it calls itself.
_quote: Callable[[str], str] = json.encoder.encode_basestring_ascii


def capped(value: Any, depth: int = 0) -> Any:
    """``value`` with long strings cut and long lists shortened, each with a marker."""
    if isinstance(value, str):
        return cap_text(value, MAX_FIELD_CHARS)
    if depth > 8:
        return cap_text(str(value), MAX_FIELD_CHARS)
    if isinstance(value, Mapping):
        return {cap_text(str(k), MAX_KEY_CHARS): capped(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = list(value)
        out = [capped(v, depth + 1) for v in items[:MAX_LIST_ITEMS]]
        if len(items) > MAX_LIST_ITEMS:
            out.append(f"...[{len(items) - MAX_LIST_ITEMS} more items cut]")
        return out
    return value


def _plain_json(value: Any) -> str | None:
    """``value`` as the encoder would write it, when that takes no capping and no
    recursion: a string within ``MAX_FIELD_CHARS``, None, an int, a bool, or a list of
    at most ``MAX_LIST_ITEMS`` such strings; else None (the encoder's work)."""
    kind = type(value)
    if kind is str:
        return _quote(value) if len(value) <= MAX_FIELD_CHARS else None
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return str(value)
    if (
        (kind is list or kind is tuple)
        and len(value) <= MAX_LIST_ITEMS
        and all(type(v) is str and len(v) <= MAX_FIELD_CHARS for v in value)
    ):
        return "[" + ",".join(map(_quote, value)) + "]"
    return None


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
    # Records come from the event loop and from worker threads (mapping, starts).
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)

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

    def _line(self, event: str, fields: Mapping[str, Any], now: str, request_id: str | None) -> str:
        # Most records hold ids, hex digests, POSIX names, reason codes, flags and short
        # lists of those: such values are written without the JSON encoder (a third of
        # the cost). A record with anything else goes through the encoder whole.
        if request_id is not None and "request_id" not in fields:
            fields = {"request_id": request_id, **fields}
        parts = [f'{{"ts":"{now}","event":{_quote(event)}']
        for key, value in fields.items():
            plain = _plain_json(value) if len(key) <= MAX_KEY_CHARS else None
            if plain is None:
                whole = {"ts": now, "event": event, **capped(dict(fields))}
                return self._encode.encode(whole) + "\n"
            parts.append(f",{_quote(key)}:{plain}")
        parts.append("}\n")
        return "".join(parts)

    def record(self, event: str, **fields: Any) -> None:
        line = self._line(event, fields, rfc3339(time.time()), current_request_id())
        self._write(line.encode())

    def record_many(self, events: Iterable[tuple[str, Mapping[str, Any]]]) -> None:
        now = rfc3339(time.time())
        request_id = current_request_id()
        lines = [self._line(event, fields, now, request_id) for event, fields in events]
        if lines:
            self._write("".join(lines).encode())

    def _write(self, data: bytes) -> None:
        with self._lock:
            if self._fd is None:
                raise AuditUnavailable(detail="audit log is not open")
            start = os.lseek(self._fd, 0, os.SEEK_END)
            view = memoryview(data)
            try:
                while view:
                    written = os.write(self._fd, view)
                    view = view[written:]
            except OSError as exc:
                self._failed = True
                self._failed_at = time.monotonic()
                cut = self._cut_back(start)
                raise AuditUnavailable(
                    detail=f"cannot write audit log {self.path}: {exc} ({cut})"
                ) from exc
            self._failed = False

    def _cut_back(self, start: int) -> str:
        """After a failed write: cut the file back to where this write began — the
        caller was told that nothing of it was recorded, and the file ends in a newline
        again. Cutting frees space, so it works on a full disk."""
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, start)
        except OSError as exc:
            return f"the partial records could not be cut: {exc}"
        return "what this write had written was cut"

    def reopen(self) -> None:
        """Reopen the file (after log rotation moved it away)."""
        self.close()
        self.open()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
