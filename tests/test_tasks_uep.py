"""The task behaviour suite end to end: daemon side → channel → a real user endpoint process.

The acceptance list of the task-execution issue, driven the way mepd drives it:
``Registry.get_or_start`` spawns ``python -m mepd.uep`` as a fresh account (useradd, removed
after) with the world-readable runtime venv of tests/runtime_venv.py, whose template
renders the engine under test and ``allowed_functions``; function bodies and arguments
travel as opaque bytes over the channel; outcomes come back through the registry's
``on_result`` / ``on_lost`` callbacks. Each engine gets one user endpoint shared by the
behaviours (a module-scoped fixture with its own event loop); a behaviour that ends the
user endpoint itself (the thread engine's ``os._exit`` and segfault) gets one of its own.

Functions are defined from source in a ``__main__`` namespace so dill sends them by value,
as it sends a scientist's notebook functions. Every wait is an awaited future with a
deadline; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import attrs
import pytest

from mepcore.ports import SystemAccountDatabase
from mepcore.spawn import ResourceLimits, SpawnSettings
from mepcore.tasks import (
    RemoteTaskError,
    ResultEnvelope,
    TaskEnvelope,
    pack_args,
    pack_function,
    unpack_result,
)
from mepcore.types import Account
from mepd.handle import UserEndpointHandle
from mepd.inflight import DispatchTask, InFlightTask
from mepd.registry import Registry, RegistryLimits, StartRequest
from mepd.spec import EndpointSpec
from tests.daemon_harness import remote_function
from tests.runtime_venv import runtime_spawn_settings

pytestmark = pytest.mark.root

T = TypeVar("T")
MiB = 1024 * 1024
DEADLINE = 60.0  # per scenario; the whole module takes far less

# The same functions as the in-process behaviour suite, run here through a real endpoint.
from tests.test_tasks_behaviour import SOURCE  # noqa: E402

NAMES = (
    "add",
    "boom",
    "unpicklable",
    "hang",
    "exit_now",
    "segfault",
    "big",
    "echo",
    "whoami",
    "gc_enabled",
    "forbidden",
)
PACKED = {name: pack_function(remote_function(SOURCE, name)) for name in NAMES}
ALLOWED = sorted(fid for name, (fid, _) in PACKED.items() if name != "forbidden")

# ``allowed`` is a user variable: a list renders as its JSON text, a YAML flow sequence.
COMMON = """\
heartbeat_period: 1
idle_heartbeats_soft: 100000
idle_heartbeats_hard: 100000
allowed_functions: {{ allowed }}
"""
TEMPLATES = {
    "ProcessPoolEngine": "engine:\n  type: ProcessPoolEngine\n  max_workers: 2\n" + COMMON,
    "ThreadPoolEngine": "engine:\n  type: ThreadPoolEngine\n  max_workers: 4\n" + COMMON,
    "GlobusComputeEngine": """\
engine:
  type: GlobusComputeEngine
  max_workers_per_node: 2
  heartbeat_period: 1
  provider:
    type: LocalProvider
    init_blocks: 1
    min_blocks: 0
    max_blocks: 1
    launcher:
      type: SingleNodeLauncher
"""
    + COMMON,
}
# RLIMIT_NPROC counts threads too: Parsl's interchange and worker pool need room.
LIMITS = ResourceLimits(nproc=256, nofile=1024, address_space=None, core=0)


@attrs.frozen
class Lost:
    """The daemon's verdict on a task whose user endpoint died under it."""

    reason: str


Outcome = ResultEnvelope | Lost


@attrs.frozen
class Call:
    name: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = attrs.field(factory=dict)
    walltime: float | None = None


def process_states(uid: int) -> dict[int, str]:
    """Processes of ``uid`` from /proc, pid → state letter (``Z`` for a zombie)."""
    out: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            with open(f"/proc/{entry}/stat", "rb") as fh:
                raw = fh.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        out[int(entry)] = raw[raw.rfind(b")") + 2 :].split()[0].decode()
    return out


def tmp_entries(uid: int) -> set[str]:
    """What ``uid`` owns directly under /tmp."""
    out = set()
    for entry in os.scandir("/tmp"):
        try:
            if entry.stat(follow_symlinks=False).st_uid == uid:
                out.add(entry.path)
        except FileNotFoundError:
            continue
    return out


def remove_paths(paths: set[str]) -> None:
    """Clean up what a test account left in /tmp (its uid goes to the next account)."""
    for path in paths:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def living_processes(uid: int, *, besides: int | None = None) -> list[int]:
    return sorted(p for p, state in process_states(uid).items() if state != "Z" and p != besides)


@attrs.define
class Endpoint:
    """One engine's registry, account and shared user endpoint, on a private event loop."""

    engine: str
    account: Account
    settings: SpawnSettings
    loop: asyncio.AbstractEventLoop = attrs.field(factory=asyncio.new_event_loop)
    registry: Registry = attrs.field(init=False)
    shared: UserEndpointHandle | None = None
    shut_down: bool = False
    waiters: dict[str, asyncio.Future[Outcome]] = attrs.field(factory=dict)
    # handle id → the account's living processes (other than the handle's own) at the
    # moment the daemon saw that user endpoint go: what its engine left behind.
    alive_at_exit: dict[str, list[int]] = attrs.field(factory=dict)
    strays: list[str] = attrs.field(factory=list)
    # /tmp entries of the uid before anything ran: uids are reused once an account is
    # deleted, and files of an earlier owner are not this endpoint's doing.
    tmp_before: set[str] = attrs.field(factory=set)
    serial: Iterator[int] = attrs.field(factory=itertools.count)

    def __attrs_post_init__(self) -> None:
        self.registry = Registry(
            self.settings,
            RegistryLimits(start_timeout=30.0, stop_grace=2.0, shutdown_timeout=30.0),
            on_result=self.on_result,
            on_lost=self.on_lost,
            on_exit=self.on_exit,
        )

    # -- the registry's callbacks (called in the event loop)

    # The registry logs and swallows what its callbacks raise: surprises are recorded in
    # ``strays`` instead, and checked at the end.

    def on_result(self, _record: InFlightTask, header: dict[str, Any], payload: bytes) -> None:
        self._settle(header["task_id"], ResultEnvelope.from_header(header, payload))

    def on_lost(self, records: list[InFlightTask], reason: str) -> None:
        for record in records:
            self._settle(record.task_id, Lost(reason))

    def _settle(self, task_id: str, outcome: Outcome) -> None:
        waiter = self.waiters.pop(task_id, None)
        if waiter is None or waiter.done():
            self.strays.append(task_id)
        else:
            waiter.set_result(outcome)

    def on_exit(self, handle: UserEndpointHandle, _why: str) -> None:
        self.alive_at_exit[handle.id] = living_processes(self.account.uid, besides=handle.pid)

    # -- driving

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = DEADLINE) -> T:
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def request(self, config_key: str) -> StartRequest:
        return StartRequest(
            spec=EndpointSpec("default", self.account.name, {"allowed": ALLOWED}, None, None),
            account=self.account,
            config_key=config_key,
            template_name="user_config_template.yaml.j2",
            template_text=TEMPLATES[self.engine],
            includes={},
            environment={},
        )

    async def outcomes(self, handle: UserEndpointHandle, calls: Sequence[Call]) -> list[Outcome]:
        """Dispatch ``calls`` in one go; their outcomes, in order."""
        loop = asyncio.get_running_loop()
        items, futures = [], []
        for call in calls:
            function_id, body = PACKED[call.name]
            handle.register_function(function_id, body)  # sent once per user endpoint
            task = TaskEnvelope(
                f"t{next(self.serial)}",
                function_id,
                pack_args(call.args, dict(call.kwargs)),
                call.walltime,
            )
            future: asyncio.Future[Outcome] = loop.create_future()
            self.waiters[task.task_id] = future
            futures.append(future)
            items.append(
                DispatchTask(task.task_id, "test", function_id, task.payload, task.walltime)
            )
        handle.dispatch(items)
        return list(await asyncio.gather(*futures))

    def results(self, calls: Sequence[Call]) -> list[ResultEnvelope]:
        assert self.shared is not None
        outcomes = self.run(self.outcomes(self.shared, calls))
        for outcome in outcomes:
            assert isinstance(outcome, ResultEnvelope), f"the user endpoint was lost: {outcome}"
        return outcomes  # type: ignore[return-value]

    def call(self, name: str, *args: Any, walltime: float | None = None) -> ResultEnvelope:
        return self.results([Call(name, args, walltime=walltime)])[0]

    def shutdown(self) -> None:
        if not self.shut_down:
            self.shut_down = True
            self.run(self.registry.shutdown())


@pytest.fixture(scope="module")
def settings() -> SpawnSettings:
    return runtime_spawn_settings(limits=LIMITS)


@pytest.fixture(
    scope="module",
    params=[
        "ProcessPoolEngine",
        "ThreadPoolEngine",
        pytest.param("GlobusComputeEngine", marks=pytest.mark.parsl),
    ],
)
def endpoint(request: pytest.FixtureRequest, settings: SpawnSettings) -> Iterator[Endpoint]:
    # The account outlives one test, so this fixture uses make_account's own helpers
    # (tests/accounts.py) rather than the function-scoped fixture; removed at teardown.
    from tests.accounts import create_account, delete_account

    entry = create_account()
    try:
        account = SystemAccountDatabase().by_name(entry.pw_name)
        assert account is not None
        ep = Endpoint(request.param, account, settings, tmp_before=tmp_entries(account.uid))
        try:
            ep.shared = ep.run(ep.registry.get_or_start(ep.request("shared")))
            yield ep
        finally:
            try:
                ep.shutdown()
            finally:
                ep.loop.close()
                remove_paths(tmp_entries(account.uid) - ep.tmp_before)
    finally:
        delete_account(entry.pw_name)


def test_tasks_run_with_the_garbage_collector_on(endpoint: Endpoint) -> None:
    # ``python -m mepd.uep`` starts with the collector off (a start allocates and frees
    # little); it is on again before the executor starts, so tasks, forked workers
    # included, never run without it.
    assert [unpack_result(r) for r in endpoint.results([Call("gc_enabled")] * 4)] == [True] * 4


def test_returns_a_value(endpoint: Endpoint) -> None:
    result = endpoint.call("add", 2, 40)
    assert result.status == "success" and result.error is None
    assert unpack_result(result) == 42
    assert result.received <= result.started <= result.finished


def test_raising_shows_type_message_and_remote_traceback(endpoint: Endpoint) -> None:
    result = endpoint.call("boom", "kaboom 17")
    assert result.reason == "task.failed"
    with pytest.raises(RemoteTaskError) as caught:
        unpack_result(result)
    err = caught.value
    assert err.type_name == "ValueError"
    assert err.message == "kaboom 17"
    assert "in inner" in err.traceback and "in boom" in err.traceback
    assert "ValueError: kaboom 17" in err.traceback
    assert "Remote traceback" in str(err)


def test_unpicklable_result_is_a_serialization_failure(endpoint: Endpoint) -> None:
    result = endpoint.call("unpicklable")
    assert result.reason == "task.serialization_failed"
    assert "generator" in result.error.message  # type: ignore[union-attr]
    assert unpack_result(endpoint.call("add", 1, 1)) == 2


def test_hanging_past_walltime_times_out(endpoint: Endpoint) -> None:
    # A thread cannot be stopped: the caller is told on time but the thread sleeps on,
    # holding one of the engine's threads, so keep its sleep short (docs/engines.md).
    seconds = 2.0 if endpoint.engine == "ThreadPoolEngine" else 600.0
    # (The timing itself is measured in bench/limits.py, not asserted here.)
    result = endpoint.call("hang", seconds, walltime=0.5)
    assert result.reason == "task.timeout"
    assert "walltime" in result.error.message  # type: ignore[union-attr]
    assert unpack_result(endpoint.call("add", 1, 2)) == 3


def _crash(endpoint: Endpoint, name: str, returncode: int) -> None:
    if endpoint.engine != "ThreadPoolEngine":
        result = endpoint.call(name)
        assert result.reason == "task.worker_lost", result
        assert [
            unpack_result(r) for r in endpoint.results([Call("add", (i, 1)) for i in range(3)])
        ] == [1, 2, 3]
        return

    # Threads share the user endpoint's process: os._exit or a segfault ends the endpoint
    # itself, and the honest outcome is the daemon's ``task.endpoint_lost``. The crash
    # gets a user endpoint of its own so the shared one serves the other behaviours.
    async def scenario() -> tuple[UserEndpointHandle, Outcome]:
        handle = await endpoint.registry.get_or_start(endpoint.request(f"crash-{name}"))
        assert handle is not endpoint.shared
        [outcome] = await endpoint.outcomes(handle, [Call(name)])
        await handle.wait_closed()
        await handle.ensure_stopped(None, 1.0)  # reaped: its exit status is known
        return handle, outcome

    handle, outcome = endpoint.run(scenario())
    assert outcome == Lost("task.endpoint_lost")
    assert handle.state == "lost"
    assert handle.process is not None and handle.process.returncode == returncode
    assert unpack_result(endpoint.call("add", 1, 1)) == 2  # the shared one is untouched


def test_os_exit_loses_the_worker_and_the_pool_recovers(endpoint: Endpoint) -> None:
    _crash(endpoint, "exit_now", 7)


def test_segfault_loses_the_worker(endpoint: Endpoint) -> None:
    _crash(endpoint, "segfault", -signal.SIGSEGV)


def test_twenty_megabytes_is_too_large(endpoint: Endpoint) -> None:
    too_big, fits = endpoint.results([Call("big", (20 * MiB,)), Call("big", (9 * MiB,))])
    assert too_big.reason == "task.result_too_large"
    assert too_big.payload == b""
    # Just under the default 10 MiB limit comes back whole, through the channel.
    assert unpack_result(fits) == b"x" * (9 * MiB)


def test_a_thousand_mixed_tasks_are_all_correct(endpoint: Endpoint) -> None:
    calls = []
    for i in range(1000):
        if i % 3 == 0:
            calls.append(Call("add", (i, 1)))
        elif i % 3 == 1:
            calls.append(Call("boom", (f"no {i}",)))
        else:
            calls.append(Call("echo", ({"i": i, "data": bytes(i % 50)},)))
    results = endpoint.results(calls)
    assert len(results) == 1000
    for i, result in enumerate(results):
        if i % 3 == 0:
            assert unpack_result(result) == i + 1
        elif i % 3 == 1:
            assert result.reason == "task.failed"
            assert result.error.message == f"no {i}"  # type: ignore[union-attr]
        else:
            assert unpack_result(result) == {"i": i, "data": bytes(i % 50)}


def test_a_function_not_in_allowed_functions_is_refused(endpoint: Endpoint) -> None:
    # The daemon sends the body like any other: the user endpoint's executor, reading
    # allowed_functions from the rendered config, is what refuses it.
    result = endpoint.call("forbidden")
    assert result.reason == "task.function_not_allowed"
    assert result.payload == b""


def test_reports_the_account_uid(endpoint: Endpoint) -> None:
    uid = endpoint.account.uid
    assert uid not in (0, os.getuid())
    assert [unpack_result(r) for r in endpoint.results([Call("whoami")] * 4)] == [uid] * 4


def test_stopping_leaves_no_process_of_the_account(endpoint: Endpoint) -> None:
    """Runs last but one for each engine: the daemon's shutdown drains and stops the user endpoint.

    The engine must have stopped its own processes (pool workers; Parsl's interchange,
    block and worker pool) *before* the user endpoint exited: the daemon's reaper kills
    whatever is left of the endpoint's session, so what the engine left behind is looked
    for at the moment the daemon sees the endpoint go (zombies excepted: orphans adopted
    by the daemon, a subreaper, are its own to reap).
    """
    handle = endpoint.shared
    assert handle is not None and handle.pid is not None
    uid = endpoint.account.uid
    before = living_processes(uid)
    assert handle.pid in before
    if endpoint.engine != "ThreadPoolEngine":
        assert len(before) > 1, "the engine's processes should run as the account"
    endpoint.shutdown()
    assert handle.exit_reason == "drained"
    assert endpoint.alive_at_exit[handle.id] == []
    assert process_states(uid) == {}
    assert endpoint.waiters == {}
    assert endpoint.strays == []


def test_stopping_leaves_no_file_in_tmp(endpoint: Endpoint) -> None:
    # For Parsl this covers the worker pool's multiprocessing socket directory: local
    # blocks get a TMPDIR inside the engine's run directory, which is removed.
    endpoint.shutdown()  # done already when the test above ran
    # Parsl's run directory (logs, submit scripts) is private and removed at shutdown.
    assert sorted(tmp_entries(endpoint.account.uid) - endpoint.tmp_before) == []
