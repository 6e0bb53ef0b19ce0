"""Process-pool engine specifics: kill and replace, requeueing, isolation, clean shutdown."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mepcore.tasks import Executor, ResultEnvelope, TaskEnvelope, pack_args, pack_function
from mepcore.tasks import unpack_result as value_of
from mepcore.tasks.process import ProcessPoolEngine, _Worker

SOURCE = """
def add(a, b):
    return a + b

def pid():
    import os
    return os.getpid()

def echo(data):
    return data

def hang(seconds):
    import time
    time.sleep(seconds)

def exit_now():
    import os
    os._exit(3)

def open_fds():
    import os
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink("/proc/self/fd/" + name)
        except OSError:
            pass
    return out

def scribble():
    # Write nonsense into every pipe this worker may write to.
    import fcntl, os
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if fd > 2 and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_WRONLY:
                os.write(fd, b"\\xff" * 16)
        except OSError:
            pass  # the descriptor listdir used is already closed
    import time
    time.sleep(30)
"""
NS: dict[str, Any] = {"__name__": "__main__"}
exec(SOURCE, NS)
PACKED = {
    name: pack_function(NS[name])
    for name in ("add", "pid", "echo", "hang", "exit_now", "open_fds", "scribble")
}
_ids = iter(range(10**9))


def task(name: str, *args: Any, walltime: float | None = None) -> TaskEnvelope:
    return TaskEnvelope(f"p{next(_ids)}", PACKED[name][0], pack_args(args, {}), walltime)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    event = threading.Event()
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        event.wait(0.01)


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def make(max_workers: int = 1, **extra: Any) -> Executor:
    executor = Executor.from_engine_config(
        {"type": "ProcessPoolEngine", "max_workers": max_workers, **extra}
    )
    executor.start()
    for fid, body in PACKED.values():
        executor.register_function(fid, body)
    return executor


@pytest.fixture
def single() -> Iterator[Executor]:
    executor = make(1)
    yield executor
    executor.shutdown()


def pool_of(executor: Executor) -> ProcessPoolEngine:
    assert isinstance(executor.engine, ProcessPoolEngine)
    return executor.engine


def result(executor: Executor, envelope: TaskEnvelope) -> ResultEnvelope:
    return executor.submit(envelope).result(30)


def test_timeout_kills_the_worker_and_replaces_it(single: Executor) -> None:
    engine = pool_of(single)
    worker = value_of(result(single, task("pid")))
    assert engine.worker_pids() == [worker]
    assert result(single, task("hang", 600, walltime=0.3)).reason == "task.timeout"
    assert process_gone(worker)  # killed and reaped before the result was reported
    wait_until(lambda: len(engine.worker_pids()) == 1)
    replacement = value_of(result(single, task("pid")))
    assert replacement != worker and engine.worker_pids() == [replacement]


def test_tasks_queued_behind_a_hung_one_are_requeued_not_lost(single: Executor) -> None:
    futures = single.submit_many(
        [task("hang", 600, walltime=0.3)] + [task("add", i, i) for i in range(20)]
    )
    assert futures[0].result(30).reason == "task.timeout"
    assert [value_of(f.result(30)) for f in futures[1:]] == [2 * i for i in range(20)]


def test_a_dying_worker_fails_exactly_its_own_task(single: Executor) -> None:
    futures = single.submit_many(
        [task("add", 1, 1), task("exit_now"), task("add", 2, 2), task("add", 3, 3)]
    )
    results = [f.result(30) for f in futures]
    assert [r.reason for r in results] == [None, "task.worker_lost", None, None]
    assert "exit status 3" in results[1].error.message  # type: ignore[union-attr]
    assert [value_of(results[i]) for i in (0, 2, 3)] == [2, 4, 6]


def test_nonsense_written_to_the_result_pipe_ends_only_that_worker(single: Executor) -> None:
    assert result(single, task("scribble")).reason == "task.worker_lost"
    assert value_of(result(single, task("add", 20, 22))) == 42


def test_workers_hold_only_stdio_and_their_pipes() -> None:
    # A descriptor the parent holds (like the endpoint's channel) must not leak into workers.
    left, right = socket.socketpair()
    try:
        executor = make(1)
        try:
            fds = value_of(result(executor, task("open_fds")))
        finally:
            executor.shutdown()
    finally:
        left.close()
        right.close()
    extra = {fd: target for fd, target in fds.items() if fd > 2}
    assert not any(target.startswith("socket:") for target in extra.values()), fds
    # two pipe ends, plus the descriptor listdir itself had open
    assert len([t for t in extra.values() if t.startswith("pipe:")]) == 2, fds
    assert len(extra) <= 3, fds


def test_shutdown_reaps_every_worker_and_leaves_no_thread() -> None:
    executor = make(2)
    engine = pool_of(executor)
    futures = executor.submit_many([task("add", i, 0) for i in range(100)])
    pids = engine.worker_pids()
    assert len(pids) == 2
    executor.shutdown(wait=True)
    assert [value_of(f.result(0)) for f in futures] == list(range(100))
    assert all(process_gone(pid) for pid in pids)
    assert not [t for t in threading.enumerate() if t.name == "mep-process-pool"]
    with pytest.raises(RuntimeError):
        executor.submit(task("add", 1, 1))


def test_shutdown_without_wait_cancels_running_work_quickly() -> None:
    executor = make(1)
    (worker,) = pool_of(executor).worker_pids()
    # The running task would hang for a day: shutdown returning at all (within the
    # generous deadline below) shows it killed the task rather than waited for it.
    futures = executor.submit_many([task("hang", 86_400), task("add", 1, 1)])
    stopper = threading.Thread(target=executor.shutdown, kwargs={"wait": False}, daemon=True)
    stopper.start()
    stopper.join(120)
    if stopper.is_alive():
        os.kill(worker, signal.SIGKILL)  # do not leave a day-long task behind
        pytest.fail("shutdown(wait=False) waited for the running task")
    assert [f.result(0).reason for f in futures] == ["task.cancelled", "task.cancelled"]
    assert process_gone(worker)


def test_two_short_tasks_run_on_two_workers_at_once() -> None:
    executor = make(2)
    try:
        pids = [value_of(f.result(30)) for f in executor.submit_many([task("pid"), task("pid")])]
        assert len(set(pids)) == 2
    finally:
        executor.shutdown(wait=False)  # a worker stuck on a broken frame must not hang this


@pytest.mark.parametrize("workers", [1, 2])
def test_large_arguments_and_results_cross_the_pipes_whole_and_in_order(workers: int) -> None:
    # Batches and results larger than a pipe holds are written in pieces (the rest waits
    # in the worker's buffer behind the next batch); every byte must come back in place.
    sizes = [3 << 20, 1, (2 << 20) + 3, 0, 5 << 20, 65536, 7, (1 << 20) - 1]
    datas = [
        bytes((i * 37 + n) % 251 for n in range(257)) * (size // 257) + b"x" * (size % 257)
        for i, size in enumerate(sizes)
    ]
    executor = make(workers)
    try:
        futures = [executor.submit(task("echo", data)) for data in datas]
        deadline = time.monotonic() + 30
        for data, future in zip(datas, futures, strict=True):
            envelope = future.result(max(0.0, deadline - time.monotonic()))
            assert envelope.status == "success", envelope
            assert value_of(envelope) == data
    finally:
        executor.shutdown(wait=False)  # a worker stuck on a broken frame must not hang this


def test_a_frame_the_pipe_cannot_take_now_waits_whole_in_the_buffer() -> None:
    # The pipe is full: nothing of the frame is written, so its head and body must both
    # wait, in order, and come out whole once the reader drains the pipe.
    import fcntl
    import selectors

    r, w = os.pipe2(os.O_NONBLOCK)
    try:
        filled = 0
        with contextlib.suppress(BlockingIOError):
            while True:
                filled += os.write(w, b"f" * 65536)
        engine = ProcessPoolEngine(max_workers=1, max_result_bytes=1 << 20)
        engine._selector = selectors.DefaultSelector()
        worker = _Worker(pid=0, pidfd=-1, to_fd=w, from_fd=r)
        data = bytes(range(256)) * 1000
        engine._send(worker, data)
        assert bytes(worker.outbuf) == len(data).to_bytes(4, "big") + data
        received = bytearray()
        deadline = time.monotonic() + 10
        while len(received) < filled + 4 + len(data):
            assert time.monotonic() < deadline
            with contextlib.suppress(BlockingIOError):
                received += os.read(r, 1 << 20)
            engine._flush(worker)
        assert received[filled:] == len(data).to_bytes(4, "big") + data
        assert not worker.outbuf and not worker.writing
        assert fcntl.fcntl(w, fcntl.F_GETFL) & os.O_NONBLOCK
    finally:
        os.close(r)
        os.close(w)
