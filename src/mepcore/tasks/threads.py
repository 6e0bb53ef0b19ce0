"""The thread engine: tasks run in worker threads inside the endpoint process.

Cheapest to start and to call, and the only engine whose tasks share the endpoint's
memory. What it cannot do, by nature of threads:

- it cannot kill a task: past its walltime the caller gets ``task.timeout`` at once,
  but the function keeps running in its thread until it returns. That thread is
  *abandoned*: a new worker takes its slot at once, so ``max_workers`` tasks can always
  run, and the abandoned thread ends as soon as its function returns (it never takes
  another task). A function that never returns keeps its thread, and its memory, for
  the life of the endpoint: use the process-pool engine for code that may hang;
- it cannot kill a task on cancel either: the caller gets ``task.cancelled`` at once,
  the thread is abandoned as on a timeout, and an exception (``TaskCancelled``) is
  raised asynchronously in it, which stops Python code at its next bytecode but not a
  call blocked in C (``time.sleep``, I/O) until that returns;
- it cannot survive a task that ends the process (``os._exit``, a segfault): the whole
  endpoint goes, and the daemon reports ``task.endpoint_lost``.

This module deliberately adds no isolation: use the process-pool engine for that.
"""

from __future__ import annotations

import ctypes
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import wait as wait_futures
from typing import Any

import attrs

from mepcore.tasks._run import FunctionLoadFailed, load_function, run_task
from mepcore.tasks.engine import CANCELLED_MESSAGE, Job, Watchdog


class TaskCancelled(BaseException):
    """Raised asynchronously in the thread of a task that was cancelled."""


def _interrupt(thread: threading.Thread) -> None:
    if thread.ident is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(thread.ident), ctypes.py_object(TaskCancelled)
        )


@attrs.define
class ThreadPoolEngine:
    max_workers: int
    max_result_bytes: int
    _queue: queue.SimpleQueue[Job | None] = attrs.field(init=False, factory=queue.SimpleQueue)
    _functions: dict[str, Callable[..., Any] | FunctionLoadFailed] = attrs.field(
        init=False, factory=dict
    )
    _outstanding: set[Job] = attrs.field(init=False, factory=set)
    # The worker thread running each job, and the workers whose job timed out.
    _running: dict[Job, threading.Thread] = attrs.field(init=False, factory=dict)
    _abandoned: set[threading.Thread] = attrs.field(init=False, factory=set)
    _workers: set[threading.Thread] = attrs.field(init=False, factory=set)
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)
    _watchdog: Watchdog | None = attrs.field(init=False, default=None)
    _serial: int = attrs.field(init=False, default=0)
    _started: bool = attrs.field(init=False, default=False)
    _stopping: bool = attrs.field(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        if self.max_workers < 1:
            raise ValueError("max_workers must be at least 1")

    @property
    def abandoned_threads(self) -> int:
        """Threads still running a task that timed out (they hold no slot)."""
        with self._lock:
            return len(self._abandoned)

    def start(self) -> None:
        if self._started:
            raise RuntimeError("the engine was already started")
        self._started = True
        self._watchdog = Watchdog(
            "mep-task-watchdog",
            "the thread engine cannot stop it: it keeps running in an abandoned thread",
            on_expired=self._abandon,
        )

    def submit(self, jobs: Sequence[Job]) -> None:
        if not self._started or self._stopping:
            raise RuntimeError("cannot submit to an engine that is not running")
        with self._lock:
            self._outstanding.update(jobs)
            # Workers start when there is work, as ThreadPoolExecutor's do: an endpoint
            # that never runs a task (or whose account is short of processes) makes none.
            wanted = min(self.max_workers - len(self._workers), len(jobs))
            for _ in range(max(0, wanted)):
                self._spawn_worker()
        for job in jobs:
            self._queue.put(job)

    def shutdown(self, wait: bool = True) -> None:
        if not self._started or self._stopping:
            return
        if wait:
            with self._lock:
                outstanding = [job.future for job in self._outstanding]
            # Timed-out tasks are already resolved, so this never waits for a hung one.
            wait_futures(outstanding)
        with self._lock:
            self._stopping = True
            leftovers = list(self._outstanding)
            self._outstanding.clear()
            workers = list(self._workers)
        for _ in workers:
            self._queue.put(None)
        if wait:
            for worker in workers:
                # Only live workers are joined: abandoned threads may never return.
                worker.join()
        if self._watchdog is not None:
            self._watchdog.stop()
        for job in leftovers:
            job.fail("task.cancelled", "the executor shut down before the task finished")

    def cancel(self, task_ids: frozenset[str]) -> None:
        """Answer ``task.cancelled`` now; a waiting job is then skipped, a running one's
        thread abandoned (a new worker takes its slot) and interrupted."""
        with self._lock:
            chosen = [
                job
                for job in self._outstanding
                if job.task.task_id in task_ids and not job.future.done()
            ]
            threads = {job: self._running.get(job) for job in chosen}
        for job in chosen:
            job.fail("task.cancelled", CANCELLED_MESSAGE)
            thread = threads.get(job)
            if thread is not None:
                self._abandon(job)
                _interrupt(thread)

    # -- workers ------------------------------------------------------------------------

    def _spawn_worker(self) -> None:
        """Start one worker (the lock is held by the caller)."""
        self._serial += 1
        worker = threading.Thread(target=self._work, name=f"mep-task_{self._serial}", daemon=True)
        self._workers.add(worker)
        worker.start()

    def _abandon(self, job: Job) -> None:
        """A job timed out: its thread gives up its slot to a new worker."""
        with self._lock:
            thread = self._running.get(job)
            if thread is None or thread in self._abandoned or self._stopping:
                return
            self._abandoned.add(thread)
            self._workers.discard(thread)
            self._spawn_worker()

    def _work(self) -> None:
        me = threading.current_thread()
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._running[job] = me
            try:
                self._run(job)
            finally:
                with self._lock:
                    self._running.pop(job, None)
                    self._outstanding.discard(job)
                    gone = me in self._abandoned
                    self._abandoned.discard(me)
            if gone:
                return

    def _function(self, job: Job) -> Callable[..., Any] | FunctionLoadFailed:
        function_id = job.task.function_id
        fn = self._functions.get(function_id)
        if fn is None:
            # Two threads may load the same body at once; both results are equivalent.
            fn = load_function(job.function_payload)
            self._functions[function_id] = fn
        return fn

    def _run(self, job: Job) -> None:
        if job.future.done():
            return
        if job.walltime is not None and self._watchdog is not None:
            self._watchdog.arm(job, job.walltime)
        job.complete(run_task(self._function(job), job.task.payload, self.max_result_bytes))
