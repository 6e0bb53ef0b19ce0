"""The one small interface every engine implements, and the unit of work it receives.

An engine takes ``Job``s (a validated task, its function body, and the future to
complete), runs them, and completes each future with a ``ResultEnvelope``. Task failures
are failed results; a future only carries an exception for a bug. This module
deliberately holds no engine: they live in their own modules and load lazily.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Protocol

import attrs

from mepcore.tasks._run import ErrorTuple, Outcome
from mepcore.tasks.envelopes import RemoteError, ResultEnvelope, TaskEnvelope

MiB = 1024 * 1024


@attrs.frozen
class ExecutorLimits:
    """Bounds on what a task may send, return and take (DESIGN.md §3.6)."""

    max_result_bytes: int = 10 * MiB
    max_payload_bytes: int = 10 * MiB
    max_function_bytes: int = 10 * MiB
    # Applied to tasks that carry no walltime of their own; None = no limit.
    default_walltime: float | None = None
    max_registered_functions: int = 10_000

    def __attrs_post_init__(self) -> None:
        for name in (
            "max_result_bytes",
            "max_payload_bytes",
            "max_function_bytes",
            "max_registered_functions",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.default_walltime is not None and not self.default_walltime > 0:
            raise ValueError("default_walltime must be positive or None")


class Job:
    """One accepted task on its way through an engine (mutable, engine-internal)."""

    __slots__ = ("function_payload", "future", "received", "task", "walltime")

    def __init__(
        self,
        task: TaskEnvelope,
        function_payload: bytes,
        future: Future[ResultEnvelope],
        received: float,
        walltime: float | None,
    ) -> None:
        self.task = task
        self.function_payload = function_payload
        self.future = future
        self.received = received
        self.walltime = walltime

    def complete(self, outcome: Outcome) -> None:
        status, payload, error, started, finished = outcome
        self.resolve(
            ResultEnvelope(
                task_id=self.task.task_id,
                status="success" if status == "success" else "failed",
                payload=payload,
                error=None if error is None else _remote_error(error),
                received=self.received,
                started=started,
                finished=finished,
            )
        )

    def fail(self, reason: str, message: str = "", started: float = 0.0) -> None:
        now = time.time()
        self.resolve(
            ResultEnvelope(
                task_id=self.task.task_id,
                status="failed",
                error=RemoteError.of(reason, message),
                received=self.received,
                started=started or now,
                finished=now,
            )
        )

    def resolve(self, result: ResultEnvelope) -> None:
        # A future may already be done (a thread-engine timeout raced the real result).
        if not self.future.done():
            try:
                self.future.set_result(result)
            except Exception:  # InvalidStateError from that same race
                return


CANCELLED_MESSAGE = "the task was cancelled"


def _remote_error(error: ErrorTuple) -> RemoteError:
    type_name, message, traceback, reason = error
    return RemoteError.of(reason, message, type_name, traceback)


class Engine(Protocol):
    """What the executor needs from an engine."""

    def start(self) -> None:
        """Start workers; may block until they are ready."""

    def submit(self, jobs: Sequence[Job]) -> None:
        """Accept jobs; each job's future is completed later, from any thread."""

    def shutdown(self, wait: bool = True) -> None:
        """Stop everything; with ``wait`` finish accepted jobs first, else fail them."""

    def cancel(self, task_ids: frozenset[str]) -> None:
        """Fail these jobs with ``task.cancelled`` and stop their work wherever it is
        (unknown or finished ids are ignored; from any thread)."""


class Watchdog:
    """One thread that fails jobs still unresolved when their deadline passes.

    For engines that cannot kill what runs a task (threads, Parsl): the caller is told
    ``task.timeout`` on time; the work itself is left to finish or be stopped otherwise.
    The thread starts on the first ``arm`` (never in a constructor) and ends at ``stop``.
    ``postpone(job)``, when given, is asked at each deadline first: a number of seconds
    re-arms the job instead (an engine whose task has not started yet says so).
    """

    def __init__(
        self,
        name: str,
        explanation: str,
        on_expired: Callable[[Job], None] | None = None,
        postpone: Callable[[Job], float | None] | None = None,
    ) -> None:
        self._name = name
        self._explanation = explanation
        self._on_expired = on_expired
        self._postpone = postpone
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._deadlines: list[tuple[float, int, Job]] = []
        self._counter = 0
        self._thread: threading.Thread | None = None
        self._stopped = False

    def arm(self, job: Job, seconds: float) -> None:
        with self._lock:
            if self._stopped:
                return
            self._counter += 1
            heapq.heappush(self._deadlines, (time.monotonic() + seconds, self._counter, job))
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name=self._name, daemon=True)
                self._thread.start()
            self._wakeup.notify()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._deadlines.clear()
            self._wakeup.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _watch(self) -> None:
        while True:
            expired: list[Job] = []
            with self._lock:
                if self._stopped:
                    return
                now = time.monotonic()
                while self._deadlines and self._deadlines[0][0] <= now:
                    job = heapq.heappop(self._deadlines)[2]
                    if not job.future.done():
                        expired.append(job)
                if not expired:
                    self._wakeup.wait(self._deadlines[0][0] - now if self._deadlines else None)
                    continue
            # Outside the lock: completing a future runs the caller's callbacks.
            for job in expired:
                later = None if self._postpone is None else self._postpone(job)
                if later is not None:
                    self.arm(job, later)
                    continue
                job.fail(
                    "task.timeout",
                    f"the task ran longer than its walltime of {job.walltime:g} s; "
                    + self._explanation,
                )
                if self._on_expired is not None:
                    self._on_expired(job)
