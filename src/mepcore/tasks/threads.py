"""The thread engine: tasks run in a ``ThreadPoolExecutor`` inside the endpoint process.

Cheapest to start and to call, and the only engine whose tasks share the endpoint's
memory. What it cannot do, by nature of threads:

- it cannot kill a task: past its walltime the caller gets ``task.timeout`` at once,
  but the function keeps running in its thread until it returns; that thread is lost to
  the pool meanwhile, and since the pool never grows past ``max_workers``, abandoned
  threads are bounded by it (a pool full of hung tasks queues new ones);
- it cannot survive a task that ends the process (``os._exit``, a segfault): the whole
  endpoint goes, and the daemon reports ``task.endpoint_lost``.

This module deliberately adds no isolation: use the process-pool engine for that.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any

import attrs

from mepcore.tasks._run import FunctionLoadFailed, load_function, run_task
from mepcore.tasks.engine import Job, Watchdog


@attrs.define
class ThreadPoolEngine:
    max_workers: int
    max_result_bytes: int
    _pool: ThreadPoolExecutor | None = attrs.field(init=False, default=None)
    _functions: dict[str, Callable[..., Any] | FunctionLoadFailed] = attrs.field(
        init=False, factory=dict
    )
    _outstanding: set[Job] = attrs.field(init=False, factory=set)
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)
    _watchdog: Watchdog = attrs.field(
        init=False,
        factory=lambda: Watchdog(
            "mep-task-watchdog", "the thread engine cannot stop it: it keeps running"
        ),
    )
    _stopping: bool = attrs.field(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        if self.max_workers < 1:
            raise ValueError("max_workers must be at least 1")

    def start(self) -> None:
        if self._pool is not None:
            raise RuntimeError("the engine was already started")
        self._pool = ThreadPoolExecutor(self.max_workers, thread_name_prefix="mep-task")

    def submit(self, jobs: Sequence[Job]) -> None:
        pool = self._pool
        if pool is None or self._stopping:
            raise RuntimeError("cannot submit to an engine that is not running")
        with self._lock:
            self._outstanding.update(jobs)
        for job in jobs:
            pool.submit(self._run, job)

    def shutdown(self, wait: bool = True) -> None:
        pool = self._pool
        if pool is None or self._stopping:
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
        # Join the threads unless some are still held by timed-out tasks (unkillable).
        pool.shutdown(wait=wait and not leftovers, cancel_futures=True)
        self._watchdog.stop()
        for job in leftovers:
            job.fail("task.cancelled", "the executor shut down before the task finished")

    def _function(self, job: Job) -> Callable[..., Any] | FunctionLoadFailed:
        function_id = job.task.function_id
        fn = self._functions.get(function_id)
        if fn is None:
            # Two threads may load the same body at once; both results are equivalent.
            fn = load_function(job.function_payload)
            self._functions[function_id] = fn
        return fn

    def _run(self, job: Job) -> None:
        try:
            if job.future.done():
                return
            if job.walltime is not None:
                self._watchdog.arm(job, job.walltime)
            job.complete(run_task(self._function(job), job.task.payload, self.max_result_bytes))
        finally:
            with self._lock:
                self._outstanding.discard(job)
