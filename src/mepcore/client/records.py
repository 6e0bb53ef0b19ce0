"""The daemon's answers about tasks and user endpoints, as frozen values.

``TaskRecord.from_mapping`` turns one task object of the HTTP API (``GET /v1/tasks/{id}``
and the items of ``POST /v1/tasks/wait``) into a value, and ``TaskRecord.outcome``
into the task's value or the exception that describes its failure. A result comes as
base64 (``result``) in a JSON answer, or as one frame of a frames answer
(``result_frame``, an index into the frames: ``mepcore.client.frames``). Parsing is strict
about what the client relies on (id, state, a result or an error for a final state) and
lenient about anything else, so a newer daemon that adds fields still works; a missing
or malformed field is ``client.protocol_error``. This module deliberately performs no
I/O.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import attrs

from mepcore.client.errors import (
    ClientError,
    RemoteException,
    TaskFailed,
    TaskInfrastructureError,
)
from mepcore.client.serialize import unpack_value

FINAL_STATES = frozenset({"success", "failed", "cancelled"})


def _protocol(detail: str) -> ClientError:
    return ClientError("client.protocol_error", detail)


def decode_b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise _protocol(f"{what} is not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _protocol(f"{what} is not valid base64") from exc


def _frame(index: Any, frames: Sequence[bytes] | None) -> bytes:
    if frames is None or type(index) is not int or not 0 <= index < len(frames):
        raise _protocol(f"result_frame {index!r} names no frame of the answer")
    return frames[index]


def _text(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    return value if isinstance(value, str) else ""


@attrs.frozen
class TaskRecord:
    """One task as the daemon reports it.

    ``state`` is ``queued``, ``dispatched``, ``running`` (not final) or ``success``,
    ``failed``, ``cancelled`` (final). A successful record carries the packed value in
    ``result``; a failed one carries ``error`` (``reason``, ``type_name``, ``message``,
    ``traceback``).
    """

    task_id: str
    state: str
    result: bytes | None = attrs.field(default=None, repr=False)
    error: Mapping[str, Any] | None = None
    raw: Mapping[str, Any] = attrs.field(factory=dict, repr=False, eq=False)

    @property
    def done(self) -> bool:
        return self.state in FINAL_STATES

    @classmethod
    def from_mapping(cls, data: Any, frames: Sequence[bytes] | None = None) -> TaskRecord:
        """One task object; ``frames``: those of a frames answer, where a result is
        ``result_frame`` (an index into them) instead of base64 ``result``."""
        if not isinstance(data, Mapping):
            raise _protocol("a task record is not an object")
        task_id = data.get("task_id", data.get("id"))
        state = data.get("state", data.get("status"))
        if not isinstance(task_id, str) or not isinstance(state, str):
            raise _protocol("a task record lacks its task_id or state")
        result = None
        if data.get("result") is not None:
            result = decode_b64(data["result"], "result")
        elif data.get("result_frame") is not None:
            result = _frame(data["result_frame"], frames)
        error = data.get("error")
        if error is not None and not isinstance(error, Mapping):
            raise _protocol("a task record's error is not an object")
        if state == "success" and result is None:
            raise _protocol(f"task {task_id[:80]} succeeded without a result")
        return cls(
            task_id=task_id,
            state=state,
            result=result,
            error=None if error is None else MappingProxyType(dict(error)),
            raw=MappingProxyType(dict(data)),
        )

    def failure(self) -> TaskFailed:
        """The exception describing a failed record (call only when ``state == "failed"``)."""
        error = self.error or {}
        reason = _text(error, "reason") or "task.failed"
        message = _text(error, "message")
        type_name = _text(error, "type_name") or _text(error, "type")
        if reason == "task.failed":
            return RemoteException(
                type_name or "Exception", message, _text(error, "traceback"), task_id=self.task_id
            )
        return TaskInfrastructureError(reason, message, task_id=self.task_id)

    def outcome(self) -> Any:
        """The task's value; raises ``RemoteException``/``TaskInfrastructureError`` for a
        failed task, ``TaskInfrastructureError`` (``task.cancelled``) for a cancelled one."""
        if self.state == "success":
            assert self.result is not None
            return unpack_value(self.result)
        if self.state == "failed":
            raise self.failure()
        if self.state == "cancelled":
            raise TaskInfrastructureError(
                "task.cancelled", "the task was cancelled", task_id=self.task_id
            )
        raise _protocol(f"task {self.task_id[:80]} is not finished ({self.state})")


@attrs.frozen
class WaitReport:
    """One answer of ``POST /v1/tasks/wait``: the final tasks among those asked for, the
    ids still pending, and the ids the daemon does not know (for this caller)."""

    tasks: tuple[TaskRecord, ...]
    pending: tuple[str, ...] = ()
    unknown: tuple[str, ...] = ()

    @classmethod
    def from_mapping(cls, data: Any, frames: Sequence[bytes] | None = None) -> WaitReport:
        items = data.get("tasks") if isinstance(data, Mapping) else None
        if not isinstance(items, list):
            raise _protocol("the wait answer lacks its tasks")
        return cls(
            tasks=tuple(TaskRecord.from_mapping(item, frames) for item in items),
            pending=_ids(data.get("pending")),
            unknown=_ids(data.get("unknown")),
        )


def _ids(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _protocol("a list of task ids is malformed")
    return tuple(value)
