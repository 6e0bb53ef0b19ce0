"""``Executor``: mep as a ``concurrent.futures.Executor``.

``submit(fn, *args, **kwargs)`` serializes the arguments in the caller's thread (so a
value that cannot be serialized fails at once, and later changes to a mutable argument
do not leak into the task) and queues the call. Two background threads do the rest:

- the *submitter* drains the queue, registers each new function once (functions are
  cached by object identity, and referred to by id), groups what it drained by
  ``user_endpoint_config`` (each configuration is its own user endpoint) and sends each
  group as one ``submit`` request — many ``submit`` calls become few HTTP requests;
- the *collector* long-polls ``POST /v1/tasks/wait`` for the oldest outstanding task ids
  and settles their futures: one request for many futures, never one per future.

Futures stay *pending* until their task is final, so ``future.cancel()`` succeeds for a
call not yet sent, and for a task already sent asks the daemon to cancel it (which it can
do while the task is still queued there). The threads are daemon threads started on the
first ``submit``: after ``shutdown()`` (or at exit of the ``with`` block) they have
finished and the process exits without waiting for anything. An executor never shut
down has its threads stopped at interpreter exit, after at most ``poll_timeout`` + 1 s
(its unfinished tasks are not waited for).

This module deliberately does not retry a failed batch: ``Client`` retries what is safe
to retry, and what remains is reported on the futures of that batch.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor as _StdExecutor
from concurrent.futures import Future
from queue import Empty, SimpleQueue
from types import MappingProxyType
from typing import Any

import attrs

from mepcore.client.errors import (
    ClientError,
    RequestRefused,
    ServiceUnavailable,
    TaskInfrastructureError,
)
from mepcore.client.records import TaskRecord
from mepcore.client.serialize import SERIALIZERS, pack_args, pack_function
from mepcore.client.service import Client, RetryPolicy, TaskRequest, _function_source

# Phases of a TaskFuture, guarded by its own lock; exactly one party moves a future out
# of QUEUED or SENT, so the stdlib Future's one-way transitions are never raced.
_QUEUED, _SENDING, _SENT, _CANCELLED, _SETTLED = range(5)
_STOP = object()
# Executors whose threads run: stopped at interpreter exit (``_stop_at_exit``).
_LIVE: weakref.WeakSet[Executor] = weakref.WeakSet()


class TaskFuture(Future[Any]):
    """The future of one task; ``task_id`` is set once the daemon has accepted it."""

    def __init__(self, canceller: Callable[[str], bool]) -> None:
        super().__init__()
        self.task_id: str | None = None
        self._phase = _QUEUED
        self._phase_lock = threading.Lock()
        self._canceller = canceller

    def cancel(self) -> bool:
        """Cancel a call not yet sent; for a sent task, ask the daemon to cancel it
        (True only if the daemon confirms the task will not run)."""
        if self._cancel_unsent():
            return True
        with self._phase_lock:
            phase, task_id = self._phase, self.task_id
        if phase == _CANCELLED:
            return True
        if phase != _SENT or task_id is None:
            return False
        try:
            confirmed = self._canceller(task_id)
        except ClientError:
            return False
        return confirmed and self._claim(_SENT, _CANCELLED) and self._mark_cancelled()

    def _cancel_unsent(self) -> bool:
        return self._claim(_QUEUED, _CANCELLED) and self._mark_cancelled()

    def _claim(self, expected: int, new: int) -> bool:
        with self._phase_lock:
            if self._phase != expected:
                return False
            self._phase = new
            return True

    def _mark_cancelled(self) -> bool:
        super().cancel()
        # Waiters of concurrent.futures.wait()/as_completed() are told only by this call.
        self.set_running_or_notify_cancel()
        return True

    def _begin_send(self) -> bool:
        return self._claim(_QUEUED, _SENDING)

    def _sent(self, task_id: str) -> None:
        with self._phase_lock:
            self.task_id = task_id
            self._phase = _SENT

    def _settle(
        self, expected: int, record: TaskRecord | None, error: BaseException | None
    ) -> None:
        """Finish the future from a final record or with ``error`` (if it is still ours)."""
        if record is not None and record.state == "cancelled":
            if self._claim(expected, _CANCELLED):
                self._mark_cancelled()
            return
        if not self._claim(expected, _SETTLED):
            return
        self.set_running_or_notify_cancel()
        if error is None and record is not None:
            try:
                self.set_result(record.outcome())
            except Exception as exc:
                self.set_exception(exc)
        else:
            self.set_exception(error)


@attrs.frozen
class _Function:
    """A serialized function and where the daemon knows it."""

    local_id: str
    payload: bytes = attrs.field(repr=False)
    name: str | None
    source: str | None = attrs.field(repr=False)


@attrs.frozen
class _Call:
    future: TaskFuture
    function: _Function
    args: bytes
    walltime: float | None
    config_key: str
    config: Mapping[str, Any]
    resources: Mapping[str, Any] | None = None


def _canonical(config: Mapping[str, Any] | None) -> tuple[str, Mapping[str, Any]]:
    try:
        key = json.dumps(dict(config or {}), sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ClientError("mep.invalid_input", f"user_endpoint_config must be JSON: {exc}") from exc
    return key, MappingProxyType(json.loads(key))


def _client_for(
    client: Client | None,
    url: str | None,
    token: str | None,
    verify: bool | str,
    retry: RetryPolicy | None,
    environ: Mapping[str, str] | None,
) -> Client:
    """The given client, or one made from ``url``/``token``/``environ`` (not both)."""
    if client is not None:
        if url is not None or token is not None or environ is not None:
            raise ClientError(
                "mep.invalid_input", "pass either client= or url=/token=/environ=, not both"
            )
        return client
    options: dict[str, Any] = {"verify": verify}
    if retry is not None:
        options["retry"] = retry
    return Client.from_environment(
        os.environ if environ is None else environ, url, token=token, **options
    )


class Executor(_StdExecutor):
    """Run Python functions on a mep endpoint, the ``concurrent.futures`` way.

    ``endpoint`` names the endpoint on the daemon; ``user_endpoint_config`` holds the
    template variables of the user endpoint to use (it may be changed between submits;
    each distinct configuration gets its own user endpoint). ``walltime`` (seconds)
    applies to the tasks submitted while it is set, and so does ``resource_specification``
    (what an MPI task asks for; ``submit_with`` sets one for a single task; see
    ``mepcore.client.functions``). ``batch_size`` bounds the tasks of
    one submit request; ``poll_timeout`` is how long one long-poll may wait;
    ``poll_size`` bounds the ids of one poll; ``give_up_after`` is how long the
    collector keeps trying an unreachable daemon before it fails the outstanding futures
    with ``ServiceUnavailable``. A call sent on its own (nothing else queued) waits up to
    ``inline_wait`` seconds for its result in the submit request itself
    (``Client.submit_and_wait``): a short call is then one request instead of two; a
    longer one goes on to the long-poll, and calls submitted meanwhile wait at most that
    long to be sent (0 turns it off).

    ``serializer`` is how functions travel: ``"dill"`` (bytecode, the default: the
    endpoint must run the client's Python minor version, else each task fails with
    ``task.version_mismatch`` before it runs) or ``"source"`` (the function's source
    text, for an endpoint on another Python; the function imports what it uses).

    Where the service and the token come from: either pass a ``client``, or ``url`` and
    ``token``. A missing ``url`` is taken from ``MEP_URL`` and a missing ``token`` from
    ``MEP_TOKEN`` in ``environ``, which defaults (None) to this process's environment,
    ``os.environ`` — the one place mepcore falls back on it, so that a scientist's
    script need not carry a credential. Pass ``environ`` to choose another source
    (``{}`` for none).
    """

    def __init__(
        self,
        endpoint: str,
        user_endpoint_config: Mapping[str, Any] | None = None,
        *,
        client: Client | None = None,
        url: str | None = None,
        token: str | None = None,
        verify: bool | str = True,
        walltime: float | None = None,
        resource_specification: Mapping[str, Any] | None = None,
        batch_size: int = 1024,
        poll_timeout: float = 2.0,
        poll_size: int = 4096,
        give_up_after: float = 300.0,
        inline_wait: float = 0.05,
        retry: RetryPolicy | None = None,
        environ: Mapping[str, str] | None = None,
        serializer: str = "dill",
    ) -> None:
        self._owns_client = client is None
        client = _client_for(client, url, token, verify, retry, environ)
        if serializer not in SERIALIZERS:
            raise ClientError(
                "mep.invalid_input",
                f"serializer must be one of {', '.join(SERIALIZERS)}, not {serializer!r}",
            )
        if batch_size < 1 or poll_size < 1 or poll_timeout < 0:
            raise ClientError("mep.invalid_input", "batch_size, poll_size must be >= 1")
        self.client = client
        self.endpoint = endpoint
        self.walltime = walltime
        self.resource_specification = resource_specification
        self.serializer = serializer
        self.batch_size = batch_size
        self.poll_timeout = poll_timeout
        self.poll_size = poll_size
        self.give_up_after = give_up_after
        self.inline_wait = max(0.0, inline_wait)
        self._config_key, self._config = _canonical(user_endpoint_config)
        self._functions: dict[int, tuple[Callable[..., Any], _Function]] = {}
        self._registered: dict[str, str] = {}  # local id -> id the daemon gave
        self._queue: SimpleQueue[_Call | object] = SimpleQueue()
        self._outstanding: dict[str, TaskFuture] = {}
        self._cond = threading.Condition()
        self._lock = threading.Lock()
        self._shutdown = False
        self._exiting = False  # the interpreter exits: the threads stop where they are
        self._submitter_done = False
        self._threads: list[threading.Thread] = []

    # -- configuration ---------------------------------------------------------------

    @property
    def user_endpoint_config(self) -> Mapping[str, Any]:
        """The variables sent with the next submits (a read-only copy)."""
        return self._config

    @user_endpoint_config.setter
    def user_endpoint_config(self, value: Mapping[str, Any] | None) -> None:
        key, config = _canonical(value)
        with self._lock:
            self._config_key, self._config = key, config

    # -- concurrent.futures.Executor ------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Queue ``fn(*args, **kwargs)`` to run on the endpoint; returns its future."""
        return self.submit_with(fn, args, kwargs)

    def submit_with(
        self,
        fn: Callable[..., Any],
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        resource_specification: Mapping[str, Any] | None = None,
    ) -> TaskFuture:
        """``submit`` with options for this task alone: ``resource_specification``
        (what an MPI task asks for) replaces the executor's for this call."""
        function = self._function(fn)
        packed = pack_args(tuple(args), dict(kwargs or {}))
        resources = (
            self.resource_specification
            if resource_specification is None
            else resource_specification  # {} asks for nothing, whatever the executor's
        )
        future = TaskFuture(self.client.cancel)
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            call = _Call(
                future,
                function,
                packed,
                self.walltime,
                self._config_key,
                self._config,
                MappingProxyType(dict(resources)) if resources else None,
            )
            if not self._threads:
                self._start_threads()
            self._queue.put(call)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new submits; with ``cancel_futures`` cancel every call not finished (those
        not yet sent, and tasks the daemon has: it stops them where they are); with
        ``wait`` return once every sent task's future is settled and the background
        threads have ended (without it they end on their own when done)."""
        with self._lock:
            already = self._shutdown
            self._shutdown = True
            threads = list(self._threads)
        if cancel_futures:
            while True:
                try:
                    item = self._queue.get_nowait()
                except Empty:
                    break
                if isinstance(item, _Call):
                    item.future.cancel()
            # Tasks already sent: the daemon stops them wherever they are.
            with self._cond:
                sent = list(self._outstanding.values())
            for future in sent:
                future.cancel()
        if not already:
            self._queue.put(_STOP)
            if not threads:
                self._close_client()
        if wait:
            for thread in threads:
                thread.join()

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """Like ``concurrent.futures.Executor.map``: the calls are submitted at once
        (``chunksize`` is accepted and ignored: batching is the submitter's job);
        results are yielded in order. If a result raises or times out, the calls not yet
        sent are cancelled (tasks already sent run to completion)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        futures = [self.submit(fn, *args) for args in zip(*iterables, strict=False)]

        def results() -> Iterator[Any]:
            try:
                futures.reverse()
                while futures:
                    future = futures.pop()
                    left = None if deadline is None else deadline - time.monotonic()
                    yield future.result(left)
            finally:
                for future in futures:
                    future._cancel_unsent()

        return results()

    # -- functions --------------------------------------------------------------------

    def _function(self, fn: Callable[..., Any]) -> _Function:
        with self._lock:
            known = self._functions.get(id(fn))
        if known is not None and known[0] is fn:
            return known[1]
        local_id, payload = pack_function(fn, self.serializer)
        name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
        function = _Function(local_id, payload, name, _function_source(fn))
        with self._lock:
            # Keep fn itself, so its id() cannot be reused by another object.
            self._functions[id(fn)] = (fn, function)
        return function

    def _register(self, functions: Iterable[_Function]) -> dict[str, str]:
        for function in functions:
            if function.local_id not in self._registered:
                self._registered[function.local_id] = self.client.register_payload(
                    function.payload, name=function.name, source=function.source
                )
        return self._registered

    # -- threads ----------------------------------------------------------------------

    def _start_threads(self) -> None:
        _LIVE.add(self)
        for target, name in ((self._submit_loop, "submitter"), (self._collect_loop, "collector")):
            thread = threading.Thread(target=target, name=f"mep-executor-{name}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _close_client(self) -> None:
        if self._owns_client:
            self.client.close()

    def _submit_loop(self) -> None:
        try:
            stop = False
            while not stop:
                calls: list[_Call] = []
                item = self._queue.get()
                if self._exiting:
                    return
                while True:
                    if item is _STOP:
                        stop = True
                    elif isinstance(item, _Call) and item.future._begin_send():
                        calls.append(item)
                    if len(calls) >= self.batch_size * 8:
                        break
                    try:
                        item = self._queue.get_nowait()
                    except Empty:
                        break
                groups: dict[str, list[_Call]] = {}
                for call in calls:
                    groups.setdefault(call.config_key, []).append(call)
                for group in groups.values():
                    for start in range(0, len(group), self.batch_size):
                        if self._exiting:
                            return
                        self._send(group[start : start + self.batch_size])
        finally:
            with self._cond:
                self._submitter_done = True
                self._cond.notify_all()

    def _send(self, calls: list[_Call], *, retried: bool = False) -> None:
        try:
            ids = self._register({c.function.local_id: c.function for c in calls}.values())
            tasks = [
                TaskRequest(ids[c.function.local_id], c.args, c.walltime, c.resources)
                for c in calls
            ]
            done: dict[str, TaskRecord] = {}
            if self.inline_wait > 0 and len(calls) == 1 and self._queue.empty():
                task_ids, report = self.client.submit_and_wait(
                    self.endpoint,
                    tasks,
                    wait=self.inline_wait,
                    user_endpoint_config=calls[0].config,
                )
                done = {record.task_id: record for record in report.tasks}
            else:
                task_ids = self.client.submit_batch(
                    self.endpoint, tasks, user_endpoint_config=calls[0].config
                )
        except RequestRefused as exc:
            if exc.reason == "task.function_unknown" and not retried:
                # The daemon lost its registrations (a new state directory): register again.
                for call in calls:
                    self._registered.pop(call.function.local_id, None)
                self._send(calls, retried=True)
                return
            functions = {c.function.local_id for c in calls}
            if exc.status in (403, 404, 413) and len(functions) > 1:
                # A refused batch was not accepted at all: send each function's calls on
                # their own, so one refused function does not fail the others.
                for local_id in functions:
                    self._send([c for c in calls if c.function.local_id == local_id], retried=True)
                return
            self._fail(calls, exc)
            return
        except Exception as exc:
            self._fail(calls, exc)
            return
        with self._cond:
            for call, task_id in zip(calls, task_ids, strict=True):
                call.future._sent(task_id)
                if task_id not in done:
                    self._outstanding[task_id] = call.future
            self._cond.notify_all()
        for call, task_id in zip(calls, task_ids, strict=True):
            if task_id in done:  # answered with the submit itself
                call.future._settle(_SENT, done[task_id], None)

    def _fail(self, calls: Iterable[_Call], error: BaseException) -> None:
        for call in calls:
            call.future._settle(_SENDING, None, error)

    def _collect_loop(self) -> None:
        failing_since: float | None = None
        try:
            while True:
                with self._cond:
                    while not (self._outstanding or self._submitter_done or self._exiting):
                        self._cond.wait()
                    if self._exiting or not self._outstanding:
                        return
                    ids = list(itertools.islice(self._outstanding, self.poll_size))
                try:
                    answer = self.client.wait_report(ids, timeout=self.poll_timeout)
                except (ServiceUnavailable, RequestRefused) as exc:
                    transient = isinstance(exc, ServiceUnavailable) or exc.status >= 500
                    now = time.monotonic()
                    failing_since = failing_since or now
                    if transient and now - failing_since < self.give_up_after:
                        # The client has already backed off; pause a little more so a
                        # client without retries does not spin against a dead daemon.
                        time.sleep(min(1.0, self.poll_timeout or 0.1))
                        continue
                    self._settle_ids(ids, None, exc)
                    continue
                except Exception as exc:
                    self._settle_ids(ids, None, exc)
                    continue
                failing_since = None
                for record in answer.tasks:
                    self._settle_ids([record.task_id], record, None)
                if answer.unknown:
                    self._settle_ids(
                        answer.unknown,
                        None,
                        TaskInfrastructureError(
                            "task.not_found", "the daemon no longer knows this task"
                        ),
                    )
        finally:
            self._close_client_when_done()

    def _close_client_when_done(self) -> None:
        with self._lock:
            closing = self._shutdown
        if closing:
            self._close_client()

    def _settle_ids(
        self, ids: Iterable[str], record: TaskRecord | None, error: BaseException | None
    ) -> None:
        with self._cond:
            futures = [(i, self._outstanding.pop(i, None)) for i in ids]
        for task_id, future in futures:
            if future is None:
                continue
            if error is not None and isinstance(error, TaskInfrastructureError):
                error = TaskInfrastructureError(error.reason, error.message, task_id=task_id)
            future._settle(_SENT, record, error)


def _stop_at_exit() -> None:
    """At interpreter exit, stop the threads of executors never shut down and give them
    a bounded moment to leave their HTTP calls (a long-poll lasts ``poll_timeout``).
    Their tasks are not waited for, as before; but threads still inside a request while
    the interpreter tears down can crash it (seen as a segfault at exit)."""
    live = list(_LIVE)
    for executor in live:
        executor._exiting = True
        executor._queue.put(_STOP)
        with executor._cond:
            executor._cond.notify_all()
    deadline = time.monotonic() + max((e.poll_timeout for e in live), default=0.0) + 1.0
    for executor in live:
        for thread in executor._threads:
            thread.join(max(0.0, deadline - time.monotonic()))


atexit.register(_stop_at_exit)
