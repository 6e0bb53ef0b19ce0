"""Thread engine specifics: what a timeout can and cannot do, and a clean shutdown."""

from __future__ import annotations

import threading
import time

from mepcore.tasks import Executor, TaskEnvelope, pack_args, pack_function, unpack_result


def _task_threads() -> list[threading.Thread]:
    return [
        t for t in threading.enumerate() if t.name.startswith(("mep-task", "mep-task-watchdog"))
    ]


def test_shutdown_joins_every_thread_when_no_task_is_stuck() -> None:
    executor = Executor.from_engine_config({"type": "ThreadPoolEngine", "max_workers": 3})
    fid, body = pack_function(sum)
    with executor:
        executor.register_function(fid, body)
        futures = executor.submit_many(
            [TaskEnvelope(f"s{i}", fid, pack_args(([i, 1],), {}), walltime=30) for i in range(50)]
        )
        assert [unpack_result(f.result(10)) for f in futures] == [i + 1 for i in range(50)]
        assert _task_threads()
    assert _task_threads() == []


# Module level, so dill sends the function by reference and it sees these very Events.
RELEASE = threading.Event()
RETURNED = threading.Event()


def stuck() -> str:
    RELEASE.wait(300)
    RETURNED.set()
    return "released"


def test_a_timed_out_task_gives_up_its_slot_and_its_thread_ends_when_it_returns() -> None:
    release = RELEASE
    release.clear()
    RETURNED.clear()
    executor = Executor.from_engine_config({"type": "ThreadPoolEngine", "max_workers": 1})
    fid, body = pack_function(stuck)
    quick_id, quick_body = pack_function(len)
    executor.start()
    try:
        executor.register_function(fid, body)
        executor.register_function(quick_id, quick_body)
        hung = executor.submit(TaskEnvelope("h", fid, pack_args((), {}), walltime=0.2))
        queued = executor.submit(TaskEnvelope("q", quick_id, pack_args(("abc",), {})))
        assert hung.result(60).reason == "task.timeout"
        # Reported while the function still runs: the walltime did not wait for it.
        assert not RETURNED.is_set()
        # The timed-out task's thread was abandoned and a new worker took the one slot:
        # the next task runs while the stuck function is still running.
        assert unpack_result(queued.result(10)) == 3
        assert not RETURNED.is_set()
        engine = executor.engine
        assert engine.abandoned_threads == 1
        release.set()
        assert RETURNED.wait(10)
        deadline = time.monotonic() + 10
        while engine.abandoned_threads and time.monotonic() < deadline:
            time.sleep(0.01)  # polling interval of a deadline loop
        assert engine.abandoned_threads == 0  # it ended once its function returned
    finally:
        release.set()
        executor.shutdown()
