"""What the client raises: refused requests, an unreachable service, failed tasks.

Every class derives from ``mepcore.errors.MepError`` and carries a dotted ``reason``.
``RequestRefused.reason`` is the server's own code, kept verbatim even when it is newer
than this client's catalogue (``REASONS``); the catalogue entry used to build the
exception is then ``client.unknown_reason``.

A task can fail in two distinct ways and the two have distinct types, so callers can
tell "my function raised" (``RemoteException``: the remote type name, message and
traceback text) from "the system lost or stopped my task" (``TaskInfrastructureError``:
``task.endpoint_lost``, ``task.timeout``, ``task.worker_lost``…). This module
deliberately does not re-create the remote exception's class: loading arbitrary types
by name in the caller's process would be neither safe nor reliable.
"""

from __future__ import annotations

from collections.abc import Iterable

from mepcore.errors import REASONS, MepError, Violation


class ClientError(MepError):
    """Base of every error the client raises on purpose."""

    default_reason = "client.protocol_error"


class SerializationError(ClientError):
    """A function, its arguments or a result could not be (de)serialized here."""

    default_reason = "task.serialization_failed"


class ServiceUnavailable(ClientError):
    """The service could not be reached, or kept failing, after the allowed retries."""

    default_reason = "client.unavailable"


class RequestRefused(ClientError):
    """The service answered a request with an error (a 4xx, or a 5xx after retries).

    ``status`` is the HTTP status, ``reason`` and ``message`` the server's,
    ``violations`` what it listed (invalid variables), ``retry_after`` its hint in
    seconds when it gave one.
    """

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        *,
        violations: Iterable[Violation] = (),
        retry_after: float | None = None,
    ) -> None:
        known = reason if reason in REASONS else "client.unknown_reason"
        super().__init__(known, message, public_message=message, violations=violations)
        # The server's code is the useful one, even when this client does not know it.
        self.reason = reason
        self.status = status
        self.message = message
        self.retry_after = retry_after

    def __str__(self) -> str:
        text = f"HTTP {self.status} {self.reason}: {self.message}"
        if self.violations:
            text += "".join(f"\n  {v.path}: {v.message}" for v in self.violations)
        return text


class TaskFailed(ClientError):
    """Base of the two ways a task can fail; ``task_id`` names the task."""

    default_reason = "task.failed"

    def __init__(self, reason: str, message: str, *, task_id: str = "") -> None:
        known = reason if reason in REASONS else "client.unknown_reason"
        super().__init__(known, message, public_message=message or None)
        self.reason = reason
        self.message = message
        self.task_id = task_id


class RemoteException(TaskFailed):
    """The function raised. ``type_name``, ``message`` and ``traceback`` describe the
    remote exception (``traceback`` is the remote traceback as text)."""

    def __init__(self, type_name: str, message: str, traceback: str, *, task_id: str = "") -> None:
        super().__init__("task.failed", message, task_id=task_id)
        self.type_name = type_name
        self.traceback = traceback

    def __str__(self) -> str:
        text = f"{self.type_name}: {self.message}"
        if self.traceback:
            text += f"\n\nRemote traceback:\n{self.traceback.rstrip()}"
        return text


class TaskInfrastructureError(TaskFailed):
    """The task did not complete for a reason outside the function: its user endpoint or
    worker was lost, it ran past its walltime, its result was too large… ``reason`` is
    the code (``task.endpoint_lost``, ``task.timeout``, ``task.worker_lost``, …)."""

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"
