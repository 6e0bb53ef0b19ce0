"""Cancel inside the user endpoint's executor (no root, no daemon): on each engine a task
waiting behind a busy worker never runs, a running one is answered ``task.cancelled``
at once and what runs it is stopped (the process pool's and Parsl's worker killed and
replaced; a thread abandoned and interrupted), a finished task is not changed; and the
client's ``shutdown(cancel_futures=True)`` cancels tasks the daemon already has.

End to end through a real ``mepd`` as root: ``tests/test_cancel_e2e.py``."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mepcore.client import Executor as ClientExecutor
from mepcore.tasks import Executor, ResultEnvelope, TaskEnvelope, pack_args, pack_function
from tests.accounts import alive
from tests.daemon_harness import remote_function
from tests.test_client_fakes import fake_daemon, wait_until

SOURCE = """
import os, time

def nap(path, seconds):
    with open(path, "w") as fh:
        fh.write(str(os.getpid()))
    # sleep(seconds) in short steps: a thread is interrupted between two of them (a
    # single long sleep in C would hold a cancelled thread until it returns)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.05)
    return "woke up"

def spin(path):
    with open(path, "w") as fh:
        fh.write(str(os.getpid()))
    while True:
        pass

def pid():
    return os.getpid()
"""
FUNCTIONS = {name: pack_function(remote_function(SOURCE, name)) for name in ("nap", "spin", "pid")}
RELEASE = threading.Event()


def engines(tmp_path: Path) -> dict[str, dict[str, Any]]:
    return {
        "threads": {"type": "ThreadPoolEngine", "max_workers": 1},
        "processes": {"type": "ProcessPoolEngine", "max_workers": 1},
        "parsl": {
            "type": "GlobusComputeEngine",
            "max_workers_per_node": 1,
            "run_dir": str(tmp_path / "run"),
            "heartbeat_period": 1,
            "heartbeat_threshold": 4,
            "job_status_kwargs": {"strategy_period": 0.2},
            "provider": {"type": "LocalProvider", "init_blocks": 1, "max_blocks": 1},
        },
    }


@pytest.fixture(params=["threads", "processes", "parsl"])
def executor(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Executor]:
    if request.param == "parsl":
        pytest.importorskip("parsl")
    with Executor.from_engine_config(engines(tmp_path)[request.param]) as running:
        for fid, body in FUNCTIONS.values():
            running.register_function(fid, body)
        yield running


def _task(name: str, *args: Any) -> TaskEnvelope:
    fid = FUNCTIONS[name][0]
    return TaskEnvelope(f"{name}-{time.monotonic_ns()}", fid, pack_args(args, {}))


def test_a_waiting_and_a_running_task_are_cancelled_and_the_worker_replaced(
    executor: Executor, tmp_path: Path
) -> None:
    finished = executor.submit(_task("pid")).result(120)
    assert finished.status == "success"
    started, never = tmp_path / "started", tmp_path / "never"
    running = _task("nap", str(started), 30)
    waiting = _task("nap", str(never), 30)
    futures = executor.submit_many([running, waiting])
    wait_until(lambda: started.exists() and started.read_text().isdigit(), 60, "the nap started")
    worker = int(started.read_text())

    executor.cancel([waiting.task_id, "no-such-task", finished.task_id])
    waited: ResultEnvelope = futures[1].result(10)
    assert (waited.status, waited.error and waited.error.reason) == ("failed", "task.cancelled")
    executor.cancel([running.task_id])
    result = futures[0].result(10)
    assert result.error is not None and result.error.reason == "task.cancelled"
    if worker != os.getpid():  # threads share this process: they cannot be killed
        wait_until(lambda: not alive(worker), 5, f"worker {worker} stopped")
    after = executor.submit(_task("pid")).result(60)
    assert after.status == "success"
    assert not never.exists()


def test_the_process_pool_kills_a_task_that_never_returns(tmp_path: Path) -> None:
    config = {"type": "ProcessPoolEngine", "max_workers": 1}
    with Executor.from_engine_config(config) as executor:
        for fid, body in FUNCTIONS.values():
            executor.register_function(fid, body)
        marker = tmp_path / "spinning"
        task = _task("spin", str(marker))
        future = executor.submit(task)
        wait_until(lambda: marker.exists() and marker.read_text().isdigit(), 30, "the spin started")
        executor.cancel([task.task_id])
        assert future.result(10).error.reason == "task.cancelled"  # type: ignore[union-attr]
        wait_until(lambda: not alive(int(marker.read_text())), 5, "the spinning worker stopped")


def held(x: int) -> int:
    RELEASE.wait(60)
    return x


def test_shutdown_with_cancel_futures_cancels_the_tasks_the_daemon_has(tmp_path: Path) -> None:
    RELEASE.clear()
    with fake_daemon(tmp_path) as daemon:
        try:
            executor = ClientExecutor("hpc", url=daemon.url, token=daemon.token(), environ={})
            futures = [executor.submit(held, i) for i in range(3)]
            wait_until(lambda: all(f.task_id is not None for f in futures))
            executor.shutdown(wait=True, cancel_futures=True)
            assert all(f.cancelled() for f in futures)
            for future in futures:
                assert daemon.kit.pipeline.store.get(str(future.task_id)).state == "cancelled"
        finally:
            RELEASE.set()
