"""A test double for the client tests: mepd's *real* HTTP API and pipeline, served by
uvicorn on 127.0.0.1 in a thread, with the user endpoints replaced by an in-process
executor.

What is real: the Starlette app (``mepd.api.create_app``), the pipeline (authentication
with local tokens, bodies, limits, the SQLite task store, the wait long-poll, status
codes and error bodies). What is fake: the site (``daemon_harness.FakeSite``: a dict
mapping, a deny set) and the user endpoints (``RunningEndpoints`` below runs each task
in a thread of this process with ``mepcore.tasks`` serialization, instead of spawning a
process as the mapped account). So these tests check the client against the daemon's
actual wire format, never the end-to-end acceptance (that is
``test_client_daemon.py``). This module holds no tests.
"""

from __future__ import annotations

import asyncio
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import uvicorn

from mepcore.tasks.serialization import pack_value, unpack_value
from mepd.admission import Admitted
from mepd.api import create_app
from mepd.inflight import DispatchTask
from mepd.pipeline import Pipeline
from tests.daemon_harness import InFlightHandle, PipelineKit, make_pipeline


class LoseTask(Exception):
    """Raised by a test function to make the fake report ``reason`` for its task."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@attrs.define
class RunningHandle(InFlightHandle):
    """A fake user endpoint: runs each task in a worker thread of this process."""

    owner: RunningEndpoints | None = None

    def dispatch(self, tasks: Sequence[DispatchTask]) -> None:
        assert self.owner is not None
        self.track(tasks)
        loop = asyncio.get_running_loop()
        for task in tasks:
            self.owner.dispatched.append(task.task_id)
            body = self.functions[task.function_id]
            self.owner.pool.submit(self.owner.run, loop, self, body, task)


@attrs.define
class RunningEndpoints:
    """The pipeline's ``UserEndpoints`` port, running tasks in a thread pool."""

    pipeline: Pipeline | None = None
    handles: dict[str, RunningHandle] = attrs.field(factory=dict)
    starts: list[Admitted] = attrs.field(factory=list)
    dispatched: list[str] = attrs.field(factory=list)
    logs: dict[str, list[str]] = attrs.field(factory=dict)
    pool: ThreadPoolExecutor = attrs.field(factory=lambda: ThreadPoolExecutor(8))

    async def get_or_start(self, admitted: Admitted) -> RunningHandle:
        key = f"{admitted.account.name}/{admitted.config_key}"
        if key not in self.handles:
            self.starts.append(admitted)
            self.handles[key] = RunningHandle(self.pipeline, key, admitted.account.name, owner=self)
        return self.handles[key]

    def run(
        self,
        loop: asyncio.AbstractEventLoop,
        handle: RunningHandle,
        body: bytes,
        task: DispatchTask,
    ) -> None:
        header: dict[str, Any] = {"task_id": task.task_id, "status": "success"}
        payload = b""
        try:
            fn = unpack_value(body)
            args, kwargs = unpack_value(task.payload)
            payload = pack_value(fn(*args, **kwargs))
        except LoseTask as lost:
            loop.call_soon_threadsafe(handle.lost, task.task_id, lost.reason)
            return
        except Exception as exc:
            header = {
                "task_id": task.task_id,
                "status": "failed",
                "error": {
                    "type_name": type(exc).__name__,
                    "message": str(exc),
                    "traceback": traceback.format_exc(),
                    "reason": "task.failed",
                },
            }
        loop.call_soon_threadsafe(handle.result, task.task_id, header, payload)

    def status(self, account_name: str | None) -> list[dict[str, Any]]:
        return [
            {"config_key": k.split("/", 1)[1], "state": "ready", "endpoint": "hpc"}
            for k in self.handles
            if account_name is None or k.startswith(account_name + "/")
        ]

    async def stop(self, account_name: str, endpoint: str, reason: str) -> int:
        keys = [k for k in self.handles if k.startswith(account_name + "/")]
        for k in keys:
            del self.handles[k]
        return len(keys)

    def cancel(self, endpoint_id: str, task_ids: Sequence[str]) -> bool:
        # A thread cannot be stopped: the task runs on; its late result is dropped.
        return endpoint_id in self.handles

    async def read_log(self, account: Any, endpoint: str, lines: int) -> dict[str, Any]:
        # The fake's "log": what a test put in ``logs`` for the account.
        text = self.logs.get(account.name)
        path = f"{account.home}/.mep/endpoints/{endpoint}/endpoint.log"
        return {"path": path, "exists": text is not None, "lines": (text or [])[-lines:]}


def _serve(app: Any, port: int) -> tuple[uvicorn.Server, threading.Thread]:
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="fake-mepd", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)  # polling interval of a deadline loop
    return server, thread


def _stop(server: uvicorn.Server, thread: threading.Thread) -> None:
    server.should_exit = True
    thread.join(30)
    if thread.is_alive():
        raise RuntimeError("the test server did not stop")


@attrs.define
class FakeDaemon:
    """The real API over a fake site and fake user endpoints, on 127.0.0.1."""

    state_dir: Path
    kit: PipelineKit
    endpoints: RunningEndpoints
    server: uvicorn.Server
    thread: threading.Thread
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token(self, username: str = "alice@example.org") -> str:
        return self.kit.token(username)

    def stop(self) -> None:
        _stop(self.server, self.thread)
        self.kit.pipeline.store.close()

    def restart(self) -> None:
        """Stop and start again on the same port and state: what was running is lost."""
        self.stop()
        self.kit, self.endpoints = _pipeline(self.state_dir)
        self.kit.pipeline.hold_queued(self.kit.pipeline.store.recover(time.time()).queued)
        self.server, self.thread = _serve(
            create_app(self.kit.pipeline, self.kit.pipeline.limits), self.port
        )


def _pipeline(state_dir: Path) -> tuple[PipelineKit, RunningEndpoints]:
    kit = make_pipeline(state_dir)
    endpoints = RunningEndpoints()
    kit.pipeline.ueps = endpoints
    endpoints.pipeline = kit.pipeline
    kit.endpoints = endpoints  # type: ignore[assignment]
    return kit, endpoints


def start_fake_daemon(state_dir: Path) -> FakeDaemon:
    kit, endpoints = _pipeline(state_dir)
    server, thread = _serve(create_app(kit.pipeline, kit.pipeline.limits), 0)
    port = server.servers[0].sockets[0].getsockname()[1]
    return FakeDaemon(state_dir, kit, endpoints, server, thread, port)


@contextmanager
def fake_daemon(state_dir: Path) -> Iterator[FakeDaemon]:
    daemon = start_fake_daemon(state_dir)
    try:
        yield daemon
    finally:
        daemon.stop()


def wait_until(
    predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition"
) -> None:
    """Poll ``predicate`` until it holds (AssertionError after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.01)  # polling interval of a deadline loop
