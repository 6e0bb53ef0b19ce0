"""Thread engine specifics: what a timeout can and cannot do, and a clean shutdown."""

from __future__ import annotations

import threading

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


def test_a_timed_out_task_keeps_its_thread_until_it_returns() -> None:
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
        # The only thread is still held by the timed-out task: the next one waits.
        assert not queued.done()
        release.set()
        assert unpack_result(queued.result(10)) == 3
    finally:
        release.set()
        executor.shutdown()
