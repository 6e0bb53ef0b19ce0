"""The process-pool engine: forked worker processes fed in batches through pipes.

One I/O thread owns everything that moves: it forks the workers, writes batches of tasks
to each worker's pipe (non-blocking, so a stuck worker never blocks the others), reads
results, completes futures, and acts as the watchdog. Each worker runs its batch in
order and writes one result frame per task, so the parent always knows which task a
worker is running: the oldest one without a result.

- Walltime: when the running task of a worker passes its walltime, the worker is killed
  with SIGKILL, that task fails with ``task.timeout``, the tasks queued behind it go back
  to the pool, and a new worker is forked.
- Cancel: a waiting task is answered ``task.cancelled`` and never sent (or skipped
  when it was sent ahead to a worker); the worker *running* a cancelled task is killed
  with SIGKILL, the tasks queued behind it go back to the pool, and it is replaced.
- Crashes: a worker that dies (segfault, ``os._exit``, OOM kill) is noticed through its
  pidfd; results already written are delivered, the running task fails with
  ``task.worker_lost``, and the worker is replaced.
- Results are serialized, and the size limit enforced, in the worker: an oversized
  value is never shipped.

This module deliberately does not serialize or validate envelopes (the executor does)
and does not start processes through ``multiprocessing``: a plain ``fork`` keeps the
worker start cheap and its file descriptors under control (workers keep only 0, 1, 2
and their two pipe ends, so a worker never holds the endpoint's channel open).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import gc
import os
import pickle
import selectors
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from mepcore.errors import TaskError
from mepcore.tasks._run import FunctionLoadFailed, failure, load_function, run_task
from mepcore.tasks.engine import CANCELLED_MESSAGE, Job

_LENGTH_BYTES = 4
_READ_CHUNK = 1 << 20
_PIPE_SIZE = 1 << 20
_PR_SET_PDEATHSIG = 1
_START_TIMEOUT = 30.0
_DRAIN_GRACE = 2.0
_RESPAWN_DELAY = 1.0
# Headroom for the framing and the error text around a result at the size limit.
_FRAME_OVERHEAD = 256 * 1024

_Batch = list[tuple[int, str, bytes | None, bytes]]


def _log() -> Any:
    # Imported when there is something to log (rare): structlog imports asyncio, which a
    # user endpoint's start does not otherwise need. Only the I/O thread, which forks
    # the workers, logs here, so a worker never inherits a half-done import.
    import structlog

    return structlog.get_logger("mepcore.tasks")


class _Worker:
    __slots__ = (
        "alive",
        "from_fd",
        "head_started",
        "inbuf",
        "killed_seq",
        "known",
        "outbuf",
        "pid",
        "pidfd",
        "queue",
        "to_fd",
        "writing",
    )

    def __init__(self, pid: int, pidfd: int, to_fd: int, from_fd: int) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.to_fd = to_fd
        self.from_fd = from_fd
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.queue: deque[tuple[int, Job]] = deque()
        self.known: set[str] = set()
        self.head_started = 0.0
        self.killed_seq: int | None = None
        self.alive = True
        self.writing = False


@attrs.define
class ProcessPoolEngine:
    """A pool of ``max_workers`` forked processes; see the module docstring."""

    max_workers: int
    max_result_bytes: int
    # Tasks sent ahead to one worker: more is faster for tiny tasks, less lowers the
    # wait of tasks queued behind a long one.
    prefetch: int = 16
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)
    _pending: deque[Job] = attrs.field(init=False, factory=deque)
    _cancels: set[str] = attrs.field(init=False, factory=set)
    _woken: bool = attrs.field(init=False, default=False)
    _state: str = attrs.field(init=False, default="new")
    _thread: threading.Thread | None = attrs.field(init=False, default=None)
    _ready: threading.Event = attrs.field(init=False, factory=threading.Event)
    _start_error: BaseException | None = attrs.field(init=False, default=None)
    _wake_r: int = attrs.field(init=False, default=-1)
    _wake_w: int = attrs.field(init=False, default=-1)
    # Owned by the I/O thread only:
    _workers: list[_Worker] = attrs.field(init=False, factory=list)
    _backlog: deque[Job] = attrs.field(init=False, factory=deque)
    _seq: int = attrs.field(init=False, default=0)
    _selector: selectors.BaseSelector | None = attrs.field(init=False, default=None)
    _prctl: Callable[..., int] | None = attrs.field(init=False, default=None)
    _crashed: bool = attrs.field(init=False, default=False)
    _respawn_at: float = attrs.field(init=False, default=0.0)

    def __attrs_post_init__(self) -> None:
        if self.max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        if self.prefetch < 1:
            raise ValueError("prefetch must be at least 1")

    # -- public interface ------------------------------------------------------------

    def start(self) -> None:
        if self._state != "new":
            raise RuntimeError("the engine was already started")
        try:
            # Resolved before any fork: dlopen in a forked child of a threaded parent
            # can deadlock.
            self._prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            self._prctl = None
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._state = "running"
        # The I/O thread forks every worker: a worker's parent-death signal fires when
        # the *thread* that forked it ends, and this thread lives as long as the pool.
        self._thread = threading.Thread(target=self._io_main, name="mep-process-pool", daemon=True)
        self._thread.start()
        if not self._ready.wait(_START_TIMEOUT) or self._start_error is not None:
            self.shutdown(wait=False)
            raise TaskError("task.engine_failed", "the process pool did not start") from (
                self._start_error
            )

    def submit(self, jobs: Sequence[Job]) -> None:
        with self._lock:
            if self._state != "running":
                raise RuntimeError("cannot submit to an engine that is not running")
            self._pending.extend(jobs)
            if not self._woken:
                self._woken = True
                self._wake_locked()

    def shutdown(self, wait: bool = True) -> None:
        with self._lock:
            if self._state == "new":
                self._state = "stopped"
                return
            if self._state == "running":
                self._state = "draining" if wait else "stopping"
            elif self._state == "draining" and not wait:
                self._state = "stopping"
            self._wake_locked()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def cancel(self, task_ids: frozenset[str]) -> None:
        """Handed to the I/O thread, which answers and stops them (module docstring)."""
        with self._lock:
            if self._state not in ("running", "draining"):
                return
            self._cancels.update(task_ids)
            self._wake_locked()

    def worker_pids(self) -> list[int]:
        """Pids of the live workers (a snapshot, for tests and introspection)."""
        return [w.pid for w in list(self._workers) if w.alive]

    # -- I/O thread ------------------------------------------------------------------

    def _wake_locked(self) -> None:
        # Under the lock, so the descriptor cannot be closed (and its number reused by
        # something else) between the check and the write.
        if self._wake_w >= 0:
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._wake_w, b"!")

    def _io_main(self) -> None:
        self._selector = selectors.DefaultSelector()
        try:
            self._selector.register(self._wake_r, selectors.EVENT_READ, None)
            for _ in range(self.max_workers):
                self._spawn()
        except BaseException as exc:
            self._start_error = exc
            self._ready.set()
            self._teardown()
            return
        self._ready.set()
        try:
            self._loop()
        except BaseException:
            # A bug here must not leave callers waiting forever: teardown fails every
            # accepted task, and the engine refuses new ones.
            self._crashed = True
            _log().exception("task.engine_crashed")
        finally:
            self._teardown()

    def _loop(self) -> None:
        selector = self._selector
        assert selector is not None
        while True:
            for key, mask in selector.select(self._select_timeout()):
                data = key.data
                if data is None:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    continue
                kind, worker = data
                if not worker.alive:
                    continue
                if kind == "out":
                    self._on_readable(worker)
                elif kind == "exit":
                    self._on_exit(worker, "exited")
                elif kind == "in" and mask & selectors.EVENT_WRITE:
                    self._flush(worker)
            with self._lock:
                if self._pending:
                    self._backlog.extend(self._pending)
                    self._pending.clear()
                self._woken = False
                state = self._state
                cancels, self._cancels = self._cancels, set()
            if state == "stopping":
                return
            if cancels:
                self._cancel(cancels)
            self._watchdog()
            if len(self._workers) < self.max_workers:
                self._replenish()
            if self._backlog:
                self._dispatch()
            if (
                state == "draining"
                and not self._backlog
                and not any(w.queue for w in self._workers)
            ):
                return

    def _select_timeout(self) -> float | None:
        nearest: float | None = None
        for worker in self._workers:
            if worker.queue and worker.killed_seq is None:
                walltime = worker.queue[0][1].walltime
                if walltime is not None:
                    due = worker.head_started + walltime
                    nearest = due if nearest is None else min(nearest, due)
        if len(self._workers) < self.max_workers:
            nearest = self._respawn_at if nearest is None else min(nearest, self._respawn_at)
        if nearest is None:
            return None
        return max(0.0, nearest - time.monotonic())

    def _spawn(self) -> None:
        assert self._selector is not None
        to_r, to_w = os.pipe2(os.O_CLOEXEC)
        from_r, from_w = os.pipe2(os.O_CLOEXEC)
        for fd in (to_w, from_w):
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, which never returns
            _child_main(to_r, from_w, self.max_result_bytes, parent, self._prctl)
        os.close(to_r)
        os.close(from_w)
        os.set_blocking(to_w, False)
        os.set_blocking(from_r, False)
        pidfd = os.pidfd_open(pid)
        worker = _Worker(pid, pidfd, to_w, from_r)
        self._workers.append(worker)
        self._selector.register(from_r, selectors.EVENT_READ, ("out", worker))
        self._selector.register(pidfd, selectors.EVENT_READ, ("exit", worker))

    def _dispatch(self) -> None:
        backlog = self._backlog
        live = [w for w in self._workers if w.alive and w.killed_seq is None]
        if not live:
            return
        live.sort(key=lambda w: len(w.queue))
        # Share the backlog out evenly so two tasks land on two workers, not one.
        share = -(-len(backlog) // len(live))
        now = time.monotonic()
        for worker in live:
            room = min(self.prefetch - len(worker.queue), share, len(backlog))
            if room <= 0:
                continue
            if not worker.queue:
                worker.head_started = now
            batch: _Batch = []
            known = worker.known
            for _ in range(room):
                job = backlog.popleft()
                if job.future.done():  # cancelled while it waited
                    continue
                self._seq += 1
                function_id = job.task.function_id
                if function_id in known:
                    body = None
                else:
                    body = job.function_payload
                    known.add(function_id)
                batch.append((self._seq, function_id, body, job.task.payload))
                worker.queue.append((self._seq, job))
            if not batch:
                continue
            self._send(worker, pickle.dumps(batch, protocol=5))
            if not backlog:
                return

    def _send(self, worker: _Worker, data: bytes) -> None:
        """Write one frame: straight from ``data`` while the pipe takes it, so a
        megabyte batch is not first copied into the worker's buffer; only what the
        pipe did not take waits there."""
        head = len(data).to_bytes(_LENGTH_BYTES, "big")
        if worker.outbuf or not worker.alive:
            worker.outbuf += head
            worker.outbuf += data
            self._flush(worker)
            return
        try:
            written = os.writev(worker.to_fd, (head, data))
        except BlockingIOError:
            written = 0
        except OSError:  # the worker is gone; its pidfd reports that
            return
        if written < _LENGTH_BYTES:
            worker.outbuf += head[written:]
            written = _LENGTH_BYTES
        if written - _LENGTH_BYTES < len(data):
            worker.outbuf += memoryview(data)[written - _LENGTH_BYTES :]
            self._flush(worker)

    def _flush(self, worker: _Worker) -> None:
        assert self._selector is not None
        try:
            written = os.write(worker.to_fd, worker.outbuf)
        except BlockingIOError:
            written = 0
        except OSError:  # the worker is gone; its pidfd reports that
            worker.outbuf.clear()
            written = 0
        if written:
            del worker.outbuf[:written]
        wants = bool(worker.outbuf)
        if wants != worker.writing:
            worker.writing = wants
            if wants:
                self._selector.register(worker.to_fd, selectors.EVENT_WRITE, ("in", worker))
            else:
                self._selector.unregister(worker.to_fd)

    def _on_readable(self, worker: _Worker) -> None:
        try:
            chunk = os.read(worker.from_fd, _READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._on_exit(worker, "closed its pipe")
            return
        worker.inbuf += chunk
        if not self._parse(worker):
            self._kill(worker)
            self._on_exit(worker, "sent a malformed frame")

    def _parse(self, worker: _Worker) -> bool:
        """Deliver every complete frame; False if the worker sent something malformed."""
        buf = worker.inbuf
        pos = 0
        end = len(buf)
        limit = self.max_result_bytes + _FRAME_OVERHEAD
        try:
            while end - pos >= _LENGTH_BYTES:
                size = int.from_bytes(buf[pos : pos + _LENGTH_BYTES], "big")
                if size > limit:
                    raise ValueError(f"frame of {size} bytes")
                if end - pos - _LENGTH_BYTES < size:
                    break
                start = pos + _LENGTH_BYTES
                # Unpickled from a view: slicing the bytearray would copy the frame.
                with memoryview(buf) as view:
                    message = pickle.loads(view[start : start + size])  # noqa: S301 - own worker
                pos = start + size
                self._on_result(worker, message)
        except Exception:
            # A task can write to its worker's pipe; nonsense there ends that worker.
            buf.clear()
            return False
        if pos:
            del buf[:pos]
        return True

    def _on_result(self, worker: _Worker, message: Any) -> None:
        seq, status, payload, error, started, finished = message
        if not worker.queue or worker.queue[0][0] != seq:
            raise ValueError("result for a task the worker is not running")
        _, job = worker.queue.popleft()
        job.complete((status, payload, error, started, finished))
        if worker.queue:
            worker.head_started = time.monotonic()

    def _cancel(self, task_ids: set[str]) -> None:
        """Answer the cancelled jobs; the watchdog then kills a worker running one."""
        kept: deque[Job] = deque()
        for job in self._backlog:
            if job.task.task_id in task_ids:
                job.fail("task.cancelled", CANCELLED_MESSAGE)
            else:
                kept.append(job)
        self._backlog = kept
        for worker in self._workers:
            for _, job in worker.queue:
                if job.task.task_id in task_ids:
                    job.fail("task.cancelled", CANCELLED_MESSAGE)

    def _watchdog(self) -> None:
        now = time.monotonic()
        for worker in self._workers:
            if not worker.alive or not worker.queue or worker.killed_seq is not None:
                continue
            seq, job = worker.queue[0]
            if job.future.done():
                # Answered while it runs (cancelled): the worker is stopped, replaced.
                worker.killed_seq = seq
                self._kill(worker)
            elif job.walltime is not None and now - worker.head_started >= job.walltime:
                worker.killed_seq = seq
                self._kill(worker)

    def _kill(self, worker: _Worker) -> None:
        # Through the pidfd: it names this very process even if its pid were reused.
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(worker.pidfd, signal.SIGKILL)

    def _on_exit(self, worker: _Worker, how: str) -> None:
        """The worker ended (or must): deliver what it wrote, fail its task, replace it."""
        if not worker.alive:
            return
        self._drain(worker)
        worker.alive = False
        self._kill(worker)
        status = _reap(worker.pid)
        self._close(worker)
        self._workers.remove(worker)
        _log().info(
            "task.worker_replaced",
            pid=worker.pid,
            how=how,
            status=_describe(status),
            timed_out=worker.killed_seq is not None,
        )
        if worker.queue:
            seq, job = worker.queue.popleft()
            if job.future.done():
                pass  # cancelled while it ran: answered already, its worker killed
            elif worker.killed_seq == seq:
                job.fail(
                    "task.timeout",
                    f"the task ran longer than its walltime of {job.walltime:g} s; "
                    "its worker was killed and replaced",
                )
            else:
                job.fail(
                    "task.worker_lost",
                    f"the worker process running the task {how} ({_describe(status)})",
                )
            self._backlog.extendleft(job for _, job in reversed(worker.queue))
            worker.queue.clear()
        # The replacement is forked by the loop (_replenish), which also retries it.

    def _replenish(self) -> None:
        """Keep ``max_workers`` workers; if forking fails (RLIMIT_NPROC, memory), retry
        later, and with no worker at all fail the waiting tasks rather than hold them."""
        now = time.monotonic()
        while len(self._workers) < self.max_workers and now >= self._respawn_at:
            try:
                self._spawn()
            except OSError as exc:
                self._respawn_at = now + _RESPAWN_DELAY
                _log().warning("task.worker_start_failed", error=str(exc))
                if not self._workers:
                    while self._backlog:
                        self._backlog.popleft().fail(
                            "task.engine_failed", f"no worker process could be started: {exc}"
                        )
                return

    def _drain(self, worker: _Worker) -> None:
        # Results the worker wrote before it ended are still in the pipe.
        for _ in range(1 << 16):
            if not worker.alive:
                return
            try:
                chunk = os.read(worker.from_fd, _READ_CHUNK)
            except (BlockingIOError, OSError):
                return
            if not chunk:
                return
            worker.inbuf += chunk
            if not self._parse(worker):
                return

    def _close(self, worker: _Worker) -> None:
        assert self._selector is not None
        for fd in (worker.from_fd, worker.pidfd) + ((worker.to_fd,) if worker.writing else ()):
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(fd)
        for fd in (worker.to_fd, worker.from_fd, worker.pidfd):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _teardown(self) -> None:
        with self._lock:
            self._state = "stopping"
            pending = list(self._pending)
            self._pending.clear()
        workers = list(self._workers)
        # Idle workers exit on end-of-file; busy ones are killed.
        for worker in workers:
            if worker.queue:
                self._kill(worker)
            with contextlib.suppress(OSError):
                os.close(worker.to_fd)
        deadline = time.monotonic() + _DRAIN_GRACE
        for worker in workers:
            _wait_exit(worker.pidfd, deadline)
            self._kill(worker)
            _reap(worker.pid)
            worker.alive = False
            with contextlib.suppress(OSError):
                os.close(worker.from_fd)
            with contextlib.suppress(OSError):
                os.close(worker.pidfd)
        orphans = [job for w in workers for _, job in w.queue] + list(self._backlog) + pending
        self._workers.clear()
        self._backlog.clear()
        for job in orphans:
            if self._crashed:
                job.fail("task.engine_failed", "the process pool failed")
            else:
                job.fail("task.cancelled", "the executor shut down before the task finished")
        if self._selector is not None:
            self._selector.close()
        with self._lock:
            self._state = "stopped"
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._wake_r = self._wake_w = -1


def _wait_exit(pidfd: int, deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return
    with selectors.DefaultSelector() as selector:
        selector.register(pidfd, selectors.EVENT_READ)
        selector.select(remaining)


def _reap(pid: int) -> int:
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return 0


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = str(number)
        return f"killed by {name}"
    if os.WIFEXITED(status):
        return f"exit status {os.WEXITSTATUS(status)}"
    return f"wait status {status}"


# -- the worker process --------------------------------------------------------------


def _child_main(  # pragma: no cover - runs in forked children
    task_fd: int,
    result_fd: int,
    max_result_bytes: int,
    parent: int,
    prctl: Callable[..., int] | None,
) -> None:
    code = 0
    try:
        # Objects inherited from the parent are never collected here, so no finalizer
        # of the parent's (a socket, a file) runs in the worker.
        gc.freeze()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(0)
        _close_fds_except({0, 1, 2, task_fd, result_fd})
        # The inherited stdio objects may hold the parent's unflushed output; keep
        # them alive (never flushed) and write through fresh ones.
        inherited = (sys.stdout, sys.stderr)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        _worker_loop(task_fd, result_fd, max_result_bytes)
        del inherited
    except BaseException:
        code = 70
    finally:
        os._exit(code)


def _close_fds_except(keep: set[int]) -> None:  # pragma: no cover - child only
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 1024))
    for fd in fds:
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _worker_loop(task_fd: int, result_fd: int, max_result_bytes: int) -> None:  # pragma: no cover
    reader = open(task_fd, "rb", buffering=256 * 1024)  # noqa: SIM115
    functions: dict[str, Any] = {}
    unknown = FunctionLoadFailed(failure("task.function_unknown", message="function not sent"))
    while True:
        head = reader.read(_LENGTH_BYTES)
        if len(head) < _LENGTH_BYTES:
            return
        size = int.from_bytes(head, "big")
        body = reader.read(size)
        if len(body) < size:
            return
        for seq, function_id, function_body, args_payload in pickle.loads(body):  # noqa: S301
            if function_body is not None:
                functions[function_id] = load_function(function_body)
            outcome = run_task(functions.get(function_id, unknown), args_payload, max_result_bytes)
            data = pickle.dumps((seq, *outcome), protocol=5)
            _write_frame(result_fd, data)


def _write_frame(fd: int, data: bytes) -> None:  # pragma: no cover - child only
    """The length and ``data`` in as few writes as the pipe allows, without joining them
    (a megabyte result is not copied once more for its four-byte head)."""
    parts = [memoryview(len(data).to_bytes(_LENGTH_BYTES, "big")), memoryview(data)]
    while parts:
        written = os.writev(fd, parts)
        while parts and written >= len(parts[0]):
            written -= len(parts.pop(0))
        if parts and written:
            parts[0] = parts[0][written:]
