"""Task and result envelopes: frozen, versioned values with a JSON-able header.

An envelope travels as a small JSON header plus opaque payload bytes, so the daemon can
route it without ever deserializing a payload (DESIGN.md §3.4). ``from_header`` validates
every field of an untrusted header (types, sizes) and refuses anything else with
``task.envelope_invalid``. This module deliberately does not load payloads, except in
``unpack_result``, the client-side helper that turns a result back into a value or an
exception.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Literal

import attrs

from mepcore.errors import REASONS, TaskError
from mepcore.tasks.serialization import unpack_value

ENVELOPE_VERSION = 1
MAX_TASK_ID_CHARS = 128
MAX_TYPE_NAME_CHARS = 256
MAX_MESSAGE_CHARS = 16 * 1024
MAX_TRACEBACK_CHARS = 64 * 1024
MAX_WALLTIME_SECONDS = 366 * 24 * 3600.0

_TASK_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_FUNCTION_ID = re.compile(r"[0-9a-f]{64}")
_TASK_KEYS = frozenset({"version", "task_id", "function_id", "walltime"})
_OPTIONAL_TASK_KEYS = frozenset({"resource_specification"})
_RESULT_KEYS = frozenset({"version", "task_id", "status", "error", "timings"})
_ERROR_KEYS = frozenset({"type_name", "message", "traceback", "reason"})
_TIMING_KEYS = frozenset({"received", "started", "finished"})

Status = Literal["success", "failed"]


def _invalid(detail: str) -> TaskError:
    return TaskError("task.envelope_invalid", detail)


def _check_keys(
    header: Mapping[str, Any],
    allowed: frozenset[str],
    what: str,
    optional: frozenset[str] = frozenset(),
) -> None:
    if not isinstance(header, Mapping):
        raise _invalid(f"{what} is not an object")
    extra = set(header) - allowed - optional
    missing = allowed - set(header)
    if extra or missing:
        raise _invalid(f"{what} keys: missing {sorted(missing)}, unexpected {sorted(extra)[:5]}")


def _check_version(header: Mapping[str, Any]) -> int:
    version = header["version"]
    if type(version) is not int or version != ENVELOPE_VERSION:
        raise _invalid(f"unsupported envelope version {version!r:.20}")
    return version


def _check_task_id(value: Any) -> str:
    if not isinstance(value, str) or not _TASK_ID.fullmatch(value):
        raise _invalid("task_id must be 1-128 characters of [A-Za-z0-9._:-]")
    return value


def _check_text(value: Any, limit: int, name: str) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise _invalid(f"{name} must be a string of at most {limit} characters")
    return value


def _check_time(value: Any, name: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        raise _invalid(f"{name} must be a finite non-negative number")
    return float(value)


def _check_walltime(value: Any) -> float | None:
    if value is None:
        return None
    if type(value) not in (int, float) or not math.isfinite(value):
        raise _invalid("walltime must be a number of seconds or null")
    if not 0 < value <= MAX_WALLTIME_SECONDS:
        raise _invalid("walltime must be positive and at most a year")
    return float(value)


@attrs.frozen
class RemoteError:
    """What went wrong with a task, as the caller may see it."""

    type_name: str
    message: str
    traceback: str
    reason: str = "task.failed"

    def to_dict(self) -> dict[str, str]:
        return {
            "type_name": self.type_name,
            "message": self.message,
            "traceback": self.traceback,
            "reason": self.reason,
        }

    @classmethod
    def from_mapping(cls, data: Any) -> RemoteError:
        _check_keys(data, _ERROR_KEYS, "error")
        reason = data["reason"]
        if not isinstance(reason, str) or not reason.startswith("task.") or reason not in REASONS:
            raise _invalid("error.reason is not a task reason code")
        return cls(
            type_name=_check_text(data["type_name"], MAX_TYPE_NAME_CHARS, "error.type_name"),
            message=_check_text(data["message"], MAX_MESSAGE_CHARS, "error.message"),
            traceback=_check_text(data["traceback"], MAX_TRACEBACK_CHARS, "error.traceback"),
            reason=reason,
        )

    @classmethod
    def of(
        cls, reason: str, message: str = "", type_name: str = "", traceback: str = ""
    ) -> RemoteError:
        """An error built here (not raised by user code); texts are truncated to the limits."""
        return cls(
            type_name=(type_name or "TaskError")[:MAX_TYPE_NAME_CHARS],
            message=(message or REASONS[reason])[:MAX_MESSAGE_CHARS],
            traceback=traceback[-MAX_TRACEBACK_CHARS:],
            reason=reason,
        )


@attrs.frozen
class TaskEnvelope:
    """One call of a registered function: which function, its packed arguments, options."""

    task_id: str
    function_id: str
    payload: bytes = attrs.field(repr=lambda p: f"<{len(p)} bytes>")
    walltime: float | None = None
    version: int = ENVELOPE_VERSION
    # What an MPI task asks for (``mepcore.tasks.resources``); None: nothing asked.
    resource_specification: Mapping[str, Any] | None = attrs.field(default=None, hash=False)

    def to_header(self) -> dict[str, Any]:
        header = {
            "version": self.version,
            "task_id": self.task_id,
            "function_id": self.function_id,
            "walltime": self.walltime,
        }
        if self.resource_specification is not None:
            header["resource_specification"] = dict(self.resource_specification)
        return header

    @classmethod
    def from_header(
        cls, header: Mapping[str, Any], payload: bytes, *, max_payload_bytes: int | None = None
    ) -> TaskEnvelope:
        _check_keys(header, _TASK_KEYS, "task header", _OPTIONAL_TASK_KEYS)
        version = _check_version(header)
        resources = header.get("resource_specification")
        spec = None
        if resources is not None:
            # Only MPI tasks ask for resources: the module is imported when one does.
            from mepcore.tasks.resources import resource_specification

            try:
                spec = resource_specification(resources)
            except TaskError as exc:
                raise _invalid(exc.detail) from exc
        function_id = header["function_id"]
        if not isinstance(function_id, str) or not _FUNCTION_ID.fullmatch(function_id):
            raise _invalid("function_id must be 64 lowercase hex digits (sha256)")
        if not isinstance(payload, bytes):
            raise _invalid("payload must be bytes")
        if max_payload_bytes is not None and len(payload) > max_payload_bytes:
            raise TaskError("task.payload_too_large", f"{len(payload)} > {max_payload_bytes} bytes")
        return cls(
            task_id=_check_task_id(header["task_id"]),
            function_id=function_id,
            payload=payload,
            walltime=_check_walltime(header["walltime"]),
            version=version,
            resource_specification=None if spec is None else spec.to_dict(),
        )


@attrs.frozen
class ResultEnvelope:
    """The outcome of one task: a packed value, or an error; and when it happened."""

    task_id: str
    status: Status
    payload: bytes = attrs.field(default=b"", repr=lambda p: f"<{len(p)} bytes>")
    error: RemoteError | None = None
    received: float = 0.0
    started: float = 0.0
    finished: float = 0.0
    version: int = ENVELOPE_VERSION

    @property
    def ok(self) -> bool:
        return self.status == "success"

    @property
    def reason(self) -> str | None:
        return None if self.error is None else self.error.reason

    def to_header(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "task_id": self.task_id,
            "status": self.status,
            "error": None if self.error is None else self.error.to_dict(),
            "timings": {
                "received": self.received,
                "started": self.started,
                "finished": self.finished,
            },
        }

    @classmethod
    def from_header(
        cls, header: Mapping[str, Any], payload: bytes, *, max_payload_bytes: int | None = None
    ) -> ResultEnvelope:
        _check_keys(header, _RESULT_KEYS, "result header")
        version = _check_version(header)
        status = header["status"]
        if status not in ("success", "failed"):
            raise _invalid("status must be 'success' or 'failed'")
        if not isinstance(payload, bytes):
            raise _invalid("payload must be bytes")
        if max_payload_bytes is not None and len(payload) > max_payload_bytes:
            raise TaskError("task.result_too_large", f"{len(payload)} > {max_payload_bytes} bytes")
        error = None if header["error"] is None else RemoteError.from_mapping(header["error"])
        if (status == "failed") != (error is not None):
            raise _invalid("a failed result carries an error, a successful one does not")
        if status == "failed" and payload:
            raise _invalid("a failed result carries no payload")
        timings = header["timings"]
        _check_keys(timings, _TIMING_KEYS, "timings")
        return cls(
            task_id=_check_task_id(header["task_id"]),
            status=status,
            payload=payload,
            error=error,
            received=_check_time(timings["received"], "timings.received"),
            started=_check_time(timings["started"], "timings.started"),
            finished=_check_time(timings["finished"], "timings.finished"),
            version=version,
        )


class RemoteTaskError(Exception):
    """A task failed remotely; carries the remote type name, message, traceback and reason."""

    def __init__(self, error: RemoteError) -> None:
        self.error = error
        self.type_name = error.type_name
        self.message = error.message
        self.traceback = error.traceback
        self.reason = error.reason
        super().__init__(f"{error.type_name}: {error.message}")

    def __str__(self) -> str:
        text = f"[{self.reason}] {self.type_name}: {self.message}"
        if self.traceback:
            text += f"\n\nRemote traceback:\n{self.traceback}"
        return text


def unpack_result(result: ResultEnvelope) -> Any:
    """The value of a successful result; raises ``RemoteTaskError`` for a failed one."""
    if result.status == "success":
        return unpack_value(result.payload)
    assert result.error is not None
    raise RemoteTaskError(result.error)
