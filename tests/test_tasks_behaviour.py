"""The task behaviour suite, run in-process against the executor on each of the three engines.

Functions under test are defined from source in a namespace named ``__main__`` so dill
sends them by value, as it would a scientist's functions: a Parsl worker (another
interpreter) can load them without importing this module.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import pytest

from mepcore.tasks import (
    Executor,
    RemoteTaskError,
    ResultEnvelope,
    TaskEnvelope,
    function_id_of,
    pack_args,
    pack_function,
    unpack_result,
)

SOURCE = """
def add(a, b):
    return a + b

def boom(message):
    def inner():
        raise ValueError(message)
    inner()

def unpicklable():
    return (i for i in range(3))  # not even dill can serialize a generator

def hang(seconds):
    import time
    time.sleep(seconds)
    return "woke up"

def exit_now():
    import os
    os._exit(7)

def segfault():
    import ctypes
    return ctypes.string_at(0)

def big(n):
    return b"x" * n

def echo(value):
    return value

def whoami():
    import os
    return os.getuid()

def gc_enabled():
    import gc
    return gc.isenabled()

def forbidden():
    return "should never run"
"""
FUNCTIONS: dict[str, Any] = {"__name__": "__main__"}
exec(SOURCE, FUNCTIONS)
PACKED = {
    name: pack_function(FUNCTIONS[name])
    for name in (
        "add",
        "boom",
        "unpicklable",
        "hang",
        "exit_now",
        "segfault",
        "big",
        "echo",
        "whoami",
        "forbidden",
    )
}
IDS = {name: fid for name, (fid, _) in PACKED.items()}
# A function body that is not a loadable function: registered and allowed everywhere.
BAD_BODY = b"dill.v1\n\x80\x05 definitely not a function"
BAD_BODY_ID = function_id_of(BAD_BODY)
ALLOWED = {fid for name, fid in IDS.items() if name != "forbidden"} | {BAD_BODY_ID}
MiB = 1024 * 1024

LOCAL_PARSL = {
    "type": "GlobusComputeEngine",
    "max_workers_per_node": 2,
    # Parsl notices dead workers once per heartbeat period.
    "heartbeat_period": 1,
    "provider": {
        "type": "LocalProvider",
        "init_blocks": 1,
        "min_blocks": 0,
        "max_blocks": 1,
        "launcher": {"type": "SingleNodeLauncher"},
    },
}
ENGINES = {
    "process": {"type": "ProcessPoolEngine", "max_workers": 2},
    "thread": {"type": "ThreadPoolEngine", "max_workers": 4},
    "parsl": LOCAL_PARSL,
}
RESULT_TIMEOUT = 60.0


@pytest.fixture(
    scope="module",
    params=[
        "process",
        "thread",
        pytest.param("parsl", marks=pytest.mark.parsl),
    ],
)
def engine(request: pytest.FixtureRequest) -> Iterator[tuple[str, Executor]]:
    name = request.param
    if name == "parsl":
        pytest.importorskip("parsl")
    executor = Executor.from_engine_config(ENGINES[name], allowed_functions=ALLOWED)
    executor.start()
    for fid, body in PACKED.values():
        executor.register_function(fid, body)
    executor.register_function(BAD_BODY_ID, BAD_BODY)
    yield name, executor
    executor.shutdown(wait=True)


_counter = iter(range(10**9))


def task(name: str, *args: Any, walltime: float | None = None, **kwargs: Any) -> TaskEnvelope:
    return TaskEnvelope(
        task_id=f"t{next(_counter)}",
        function_id=IDS[name],
        payload=pack_args(args, kwargs),
        walltime=walltime,
    )


def run(executor: Executor, envelope: TaskEnvelope) -> ResultEnvelope:
    future: Future[ResultEnvelope] = executor.submit(envelope)
    result = future.result(RESULT_TIMEOUT)
    assert result.task_id == envelope.task_id
    return result


def test_returns_a_value(engine: tuple[str, Executor]) -> None:
    _, executor = engine
    result = run(executor, task("add", 2, b=40))
    assert result.status == "success" and result.error is None
    assert unpack_result(result) == 42
    assert result.received <= result.finished and result.started <= result.finished


def test_raising_shows_type_message_and_remote_traceback(engine: tuple[str, Executor]) -> None:
    _, executor = engine
    result = run(executor, task("boom", "kaboom 17"))
    assert result.status == "failed" and result.reason == "task.failed"
    with pytest.raises(RemoteTaskError) as caught:
        unpack_result(result)
    err = caught.value
    assert err.type_name == "ValueError"
    assert err.message == "kaboom 17"
    assert "in inner" in err.traceback and "in boom" in err.traceback
    assert "ValueError: kaboom 17" in err.traceback


def test_unpicklable_result_is_a_serialization_failure(engine: tuple[str, Executor]) -> None:
    _, executor = engine
    result = run(executor, task("unpicklable"))
    assert result.reason == "task.serialization_failed"
    assert "generator" in result.error.message  # type: ignore[union-attr]
    assert unpack_result(run(executor, task("add", 1, 1))) == 2


def test_hanging_past_walltime_times_out(engine: tuple[str, Executor]) -> None:
    name, executor = engine
    # The thread engine cannot stop the sleeping thread: keep its sleep short.
    # Without the walltime the thread's sleep ends in success ("woke up") and the process
    # engine's outlasts run()'s deadline: either way the assertions below fail.
    seconds = 2.0 if name == "thread" else 600.0
    result = run(executor, task("hang", seconds, walltime=0.5))
    assert result.reason == "task.timeout"
    assert "walltime" in result.error.message  # type: ignore[union-attr]
    assert unpack_result(run(executor, task("add", 1, 2))) == 3


def test_os_exit_loses_the_worker_and_the_pool_recovers(engine: tuple[str, Executor]) -> None:
    name, executor = engine
    if name == "thread":
        pytest.skip(
            "threads share the endpoint process: os._exit ends the endpoint itself "
            "(the daemon reports task.endpoint_lost)"
        )
    result = run(executor, task("exit_now"))
    assert result.reason == "task.worker_lost"
    assert [unpack_result(run(executor, task("add", i, 1))) for i in range(3)] == [1, 2, 3]


def test_segfault_loses_the_worker(engine: tuple[str, Executor]) -> None:
    name, executor = engine
    if name == "thread":
        pytest.skip(
            "threads share the endpoint process: a segfault ends the endpoint itself "
            "(the daemon reports task.endpoint_lost)"
        )
    result = run(executor, task("segfault"))
    assert result.reason == "task.worker_lost"
    assert unpack_result(run(executor, task("add", 5, 5))) == 10


def test_twenty_megabytes_is_too_large(engine: tuple[str, Executor]) -> None:
    _, executor = engine
    result = run(executor, task("big", 20 * MiB))
    assert result.reason == "task.result_too_large"
    assert result.payload == b""
    # Just under the default 10 MiB limit is fine.
    assert len(unpack_result(run(executor, task("big", 9 * MiB)))) == 9 * MiB


def test_a_thousand_mixed_tasks_are_all_correct(engine: tuple[str, Executor]) -> None:
    _, executor = engine
    envelopes = []
    for i in range(1000):
        if i % 3 == 0:
            envelopes.append(task("add", i, 1))
        elif i % 3 == 1:
            envelopes.append(task("boom", f"no {i}"))
        else:
            envelopes.append(task("echo", {"i": i, "data": bytes(i % 50)}))
    futures = executor.submit_many(envelopes)
    for i, (envelope, future) in enumerate(zip(envelopes, futures, strict=True)):
        result = future.result(RESULT_TIMEOUT)
        assert result.task_id == envelope.task_id
        if i % 3 == 0:
            assert unpack_result(result) == i + 1
        elif i % 3 == 1:
            assert result.reason == "task.failed" and result.error.message == f"no {i}"  # type: ignore[union-attr]
        else:
            assert unpack_result(result) == {"i": i, "data": bytes(i % 50)}


def test_a_function_not_allowed_is_refused(engine: tuple[str, Executor]) -> None:
    _, executor = engine
    result = run(executor, task("forbidden"))
    assert result.reason == "task.function_not_allowed"
    assert result.payload == b""


def test_an_unknown_function_is_refused() -> None:
    # Checked by the executor before any engine sees the task.
    executor = Executor.from_engine_config({"type": "ThreadPoolEngine", "max_workers": 1})
    with executor:
        result = run(executor, task("add", 1, 2))
        assert result.reason == "task.function_unknown"


def test_undeserializable_payloads_are_task_failures(engine: tuple[str, Executor]) -> None:
    _, executor = engine
    garbage = TaskEnvelope("bad-args", IDS["add"], b"dill.v1\n\x80\x05not a pickle")
    assert run(executor, garbage).reason == "task.deserialization_failed"
    untagged = TaskEnvelope("no-tag", IDS["add"], b"\x80\x05\x95")
    assert run(executor, untagged).reason == "task.deserialization_failed"
    unknown = TaskEnvelope("odd-tag", IDS["add"], b"evil.v9\nimport os")
    assert run(executor, unknown).reason == "task.unknown_strategy"
    assert unpack_result(run(executor, task("add", 2, 2))) == 4


def test_an_undeserializable_function_body_is_a_task_failure(
    engine: tuple[str, Executor],
) -> None:
    _, executor = engine
    result = run(executor, TaskEnvelope("bad-fn", BAD_BODY_ID, pack_args((), {})))
    assert result.reason == "task.deserialization_failed"
    assert unpack_result(run(executor, task("add", 3, 3))) == 6


def test_reports_the_executing_uid(engine: tuple[str, Executor]) -> None:
    _, executor = engine
    assert unpack_result(run(executor, task("whoami"))) == os.getuid()
