"""Root tests of the user endpoint lifecycle with real accounts and a real runtime venv.

Each test creates its accounts with useradd (removed after), spawns user endpoints
through ``mepd.registry.Registry`` and checks what they report and what is left in
/proc. No sleeping: every wait is an awaited event or a poll with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from mepcore.errors import ConfigError, SpawnError
from mepcore.ports import SystemAccountDatabase
from mepcore.spawn import ResourceLimits, SpawnSettings
from mepcore.types import Account
from mepd.handle import UserEndpointHandle
from mepd.inflight import DispatchTask, InFlightTask
from mepd.registry import Registry, RegistryLimits, StartRequest
from mepd.spec import EndpointSpec
from tests.accounts import processes_of
from tests.runtime_venv import runtime_spawn_settings

pytestmark = pytest.mark.root

TEMPLATE = """\
engine:
  type: {{ engine }}
heartbeat_period: {{ period }}
idle_heartbeats_soft: {{ soft }}
idle_heartbeats_hard: 10000
{% if setup is defined %}endpoint_setup: {{ setup }}
{% endif %}"""

LIMITS = ResourceLimits(nproc=64, nofile=256, address_space=None, core=0)


@pytest.fixture(scope="session")
def settings() -> SpawnSettings:
    return runtime_spawn_settings(limits=LIMITS)


def account_of(entry: Any) -> Account:
    account = SystemAccountDatabase().by_name(entry.pw_name)
    assert account is not None
    return account


def request(account: Account, key: str = "k1", **variables: Any) -> StartRequest:
    values: dict[str, Any] = {"engine": "ThreadPoolEngine", "period": 0.05, "soft": 10000}
    values.update(variables)
    return StartRequest(
        spec=EndpointSpec("default", account.name, values, None, None),
        account=account,
        config_key=key,
        template_name="user_config_template.yaml.j2",
        template_text=TEMPLATE,
        includes={},
        environment={"SITE_NAME": "test"},
    )


class Recorder:
    def __init__(self) -> None:
        self.results: list[tuple[str, dict[str, Any], bytes]] = []
        self.lost: list[tuple[list[str], str]] = []

    def on_result(self, record: InFlightTask, header: dict[str, Any], payload: bytes) -> None:
        self.results.append((record.endpoint_id or "", header, payload))

    def on_lost(self, records: list[InFlightTask], reason: str) -> None:
        self.lost.append(([r.task_id for r in records], reason))


def make_registry(settings: SpawnSettings, rec: Recorder, **limits: Any) -> Registry:
    values: dict[str, Any] = {"start_timeout": 20.0, "stop_grace": 2.0, "shutdown_timeout": 10.0}
    values.update(limits)
    return Registry(
        settings, RegistryLimits(**values), on_result=rec.on_result, on_lost=rec.on_lost
    )


@contextlib.asynccontextmanager
async def serving(settings: SpawnSettings, rec: Recorder, **limits: Any) -> AsyncIterator[Registry]:
    """A registry (``make_registry``) that is shut down when the block ends, however."""
    registry = make_registry(settings, rec, **limits)
    try:
        yield registry
    finally:
        await registry.shutdown()


def pretend(task_id: str, handle: UserEndpointHandle) -> InFlightTask:
    """The record of a task as if ``handle`` were running it."""
    return InFlightTask(task_id, "owner", handle.account.name, "f" * 64, handle.id, 0.0)


def dispatch_task(task: Any) -> DispatchTask:
    return DispatchTask(task.task_id, "owner", task.function_id, task.payload, task.walltime)


def run(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(coro_fn(), 60))


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.01)  # a poll interval, not a wait for a process


def test_introspect_reports_exactly_the_account(settings: SpawnSettings, make_account: Any) -> None:
    from tests.accounts import create_group, delete_group

    extra = create_group()
    try:
        account = account_of(make_account(groups=[extra]))
        rec = Recorder()

        async def scenario() -> dict[str, Any]:
            async with serving(settings, rec) as registry:
                handle = await registry.get_or_start(request(account))
                return await handle.introspect()

        info = run(scenario)
    finally:
        delete_group(extra)
    assert info["uid"] == info["euid"] == account.uid
    assert info["gid"] == info["egid"] == account.gid
    assert sorted(info["groups"]) == sorted(set(account.group_ids))
    assert 0 not in info["groups"] and len(account.group_ids) == 2
    assert info["umask"] == 0o077
    assert info["cwd"] == account.home
    assert set(info["env_keys"]) <= {
        "HOME",
        "USER",
        "LOGNAME",
        "SHELL",
        "PATH",
        "LANG",
        "TZ",
        "SITE_NAME",
    }
    assert {"HOME", "USER", "PATH", "SITE_NAME"} <= set(info["env_keys"])
    # Handed over: the standard streams and the channel, nothing else; opened since, as
    # the account: its own log (in its home), pipes and sockets of its engine, unnamed
    # temporary files.
    assert info["inherited_fds"] == sorted({0, 1, 2, info["channel_fd"]})
    for fd in info["fds"]:
        target = fd["target"]
        mine = target.startswith((account.home, "/dev/")) or target.endswith(" (deleted)")
        assert not target.startswith("/") or mine, fd
    assert info["sid"] == info["pid"] == info["pgid"]
    assert info["rlimits"]["RLIMIT_NPROC"] == [64, 64]
    assert info["rlimits"]["RLIMIT_NOFILE"] == [256, 256]
    assert info["rlimits"]["RLIMIT_CORE"] == [0, 0]
    for name in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert int(info["capabilities"][name], 16) == 0, name
    assert info["setuid_refused"] is True
    assert processes_of(account.uid) == []


def test_one_endpoint_for_concurrent_identical_requests_two_for_different_keys(
    settings: SpawnSettings, make_account: Any
) -> None:
    account = account_of(make_account())
    rec = Recorder()

    async def scenario() -> tuple[Any, ...]:
        async with serving(settings, rec) as registry:
            a, b = await asyncio.gather(
                registry.get_or_start(request(account, "k1")),
                registry.get_or_start(request(account, "k1")),
            )
            c = await registry.get_or_start(request(account, "k2", soft=9999))
            statuses = registry.status(account.name)
            return a, b, c, statuses

    a, b, c, statuses = run(scenario)
    assert a is b
    assert c is not a and c.pid != a.pid
    assert sorted(s.config_key for s in statuses) == ["k1", "k2"]
    assert all(s.state == "ready" and s.uid == account.uid for s in statuses)
    assert processes_of(account.uid) == []


def test_unreadable_interpreter_is_refused_before_spawning(
    settings: SpawnSettings, make_account: Any, tmp_path: Any
) -> None:
    account = account_of(make_account())
    # The classic mistake: an interpreter (here a link to a good one) under /root.
    assert os.stat("/root").st_mode & 0o005 == 0, "this test expects /root to be private"
    private = tempfile.mkdtemp(prefix="mep-test-", dir="/root")
    os.chmod(private, 0o755)  # readable itself, but /root above it is not searchable
    bad = SpawnSettings(python=f"{private}/python3", package_paths=(), limits=LIMITS)
    os.symlink(settings.python, bad.python)
    rec = Recorder()

    async def scenario() -> None:
        registry = make_registry(bad, rec)
        try:
            await registry.get_or_start(request(account))
        finally:
            await registry.shutdown()

    try:
        with pytest.raises(SpawnError) as info:
            run(scenario)
    finally:
        shutil.rmtree(private)
    assert info.value.reason == "spawn.interpreter_unreadable"
    assert "/root" in info.value.detail and "venv" in info.value.detail
    assert processes_of(account.uid) == []


def test_sigkill_is_detected_and_next_request_gets_a_new_endpoint(
    settings: SpawnSettings, make_account: Any
) -> None:
    account = account_of(make_account())
    rec = Recorder()

    async def scenario() -> tuple[int | None, int | None, str]:
        async with serving(settings, rec) as registry:
            first = await registry.get_or_start(request(account))
            # As if dispatched and still running:
            registry.in_flight.add([pretend("pretend-task", first)])
            assert first.pid is not None
            os.kill(first.pid, signal.SIGKILL)
            await asyncio.wait_for(first.wait_closed(), 5)
            second = await registry.get_or_start(request(account))
            return first.pid, second.pid, first.state

    old, new, state = run(scenario)
    assert old != new and new is not None
    assert state == "lost"
    assert rec.lost == [(["pretend-task"], "task.endpoint_lost")]
    assert processes_of(account.uid) == []


def test_config_that_fails_to_render_returns_the_error_and_leaves_no_process(
    settings: SpawnSettings, make_account: Any
) -> None:
    account = account_of(make_account())
    rec = Recorder()

    async def scenario() -> None:
        registry = make_registry(settings, rec)
        req = request(account)
        req = StartRequest(
            spec=EndpointSpec(
                "default", req.account.name, {"engine": "ThreadPoolEngine"}, None, None
            ),
            account=req.account,
            config_key="bad",
            template_name=req.template_name,
            template_text="engine:\n  type: {{ engine }}\nheartbeat_period: {{ missing_variable }}\n",
            includes={},
            environment={},
        )
        try:
            await registry.get_or_start(req)
        finally:
            assert registry.status() == []
            await registry.shutdown()

    with pytest.raises(ConfigError) as info:
        run(scenario)
    assert info.value.reason.startswith("config.")
    assert processes_of(account.uid) == []


def test_idle_shutdown_happens_and_is_reported(settings: SpawnSettings, make_account: Any) -> None:
    account = account_of(make_account())
    rec = Recorder()

    async def scenario() -> tuple[str | None, str]:
        async with serving(settings, rec) as registry:
            handle = await registry.get_or_start(request(account, soft=3))
            await asyncio.wait_for(handle.wait_closed(), 10)
            await handle.ensure_stopped(None, 1.0)
            return handle.exit_reason, handle.state

    reason, state = run(scenario)
    assert reason == "idle"
    assert state == "lost"  # it left on its own: not stopped by the daemon
    assert processes_of(account.uid) == []


def test_shutdown_leaves_no_process_of_any_account(
    settings: SpawnSettings, make_account: Any
) -> None:
    accounts = [account_of(make_account()) for _ in range(2)]
    rec = Recorder()

    async def scenario() -> list[int]:
        registry = make_registry(settings, rec)
        handles = []
        for account in accounts:
            handles.append(
                await registry.get_or_start(request(account, "a", engine="ProcessPoolEngine"))
            )
            handles.append(await registry.get_or_start(request(account, "b")))
        pids = [h.pid for h in handles]
        await registry.shutdown()
        assert registry.status() == []
        return [p for p in pids if p is not None]

    pids = run(scenario)
    assert len(set(pids)) == 4
    for account in accounts:
        assert processes_of(account.uid) == []


def test_fork_bomb_in_endpoint_setup_is_contained_by_rlimit_nproc(
    settings: SpawnSettings, make_account: Any
) -> None:
    account = account_of(make_account())
    rec = Recorder()
    # Bounded: at most 200 forks, each child sleeping; RLIMIT_NPROC=64 must stop most.
    bomb = "i=0; while [ $i -lt 200 ]; do (sleep 30 &) 2>/dev/null; i=$((i+1)); done; exit 0"

    async def scenario() -> tuple[int, dict[str, Any]]:
        async with serving(settings, rec) as registry:
            handle = await registry.get_or_start(request(account, setup=bomb))
            count = len(processes_of(account.uid))
            info = await handle.introspect()
            print("processes of the account after the bomb:", count)
            return count, info

    count, info = run(scenario)
    assert info["uid"] == account.uid  # still alive and answering
    assert 1 < count <= LIMITS.nproc
    assert processes_of(account.uid) == []


def _by_value(source: str, name: str) -> Any:
    """A function dill serializes by value (as if typed in a notebook), not by module."""
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(source, namespace)
    return namespace[name]


@pytest.mark.parametrize("engine", ["ThreadPoolEngine", "ProcessPoolEngine"])
def test_tasks_run_as_the_account_and_every_result_comes_back(
    settings: SpawnSettings, make_account: Any, engine: str
) -> None:
    from mepcore.tasks import ResultEnvelope, TaskEnvelope, pack_args, pack_function, unpack_result

    account = account_of(make_account())
    rec = Recorder()
    whoami_id, whoami = pack_function(
        _by_value("def whoami(x):\n    import os\n    return (os.getuid(), x)\n", "whoami")
    )
    count = 500

    async def scenario() -> None:
        async with serving(settings, rec) as registry:
            handle = await registry.get_or_start(request(account, engine=engine))
            handle.register_function(whoami_id, whoami)
            handle.register_function(whoami_id, whoami)  # sent once only
            tasks = [TaskEnvelope(f"t{i}", whoami_id, pack_args((i,), {})) for i in range(count)]
            handle.dispatch([dispatch_task(t) for t in tasks])
            assert handle.in_flight == count == len(registry.in_flight)
            await until(lambda: len(rec.results) == count, timeout=30)
            assert handle.in_flight == 0 == len(registry.in_flight)

    run(scenario)
    seen = {}
    for _uep, header, payload in rec.results:
        result = ResultEnvelope.from_header(header, payload)
        seen[result.task_id] = unpack_result(result)
    assert seen == {f"t{i}": (account.uid, i) for i in range(count)}
    assert rec.lost == []
    assert processes_of(account.uid) == []


def test_results_for_tasks_not_dispatched_to_that_endpoint_are_refused(
    settings: SpawnSettings, make_account: Any
) -> None:
    """A user endpoint can only complete tasks the daemon gave it, with valid headers."""
    from mepcore.tasks import ResultEnvelope
    from mepd.channel import Frame

    account = account_of(make_account())
    rec = Recorder()

    async def scenario() -> None:
        async with serving(settings, rec) as registry:
            handle = await registry.get_or_start(request(account))
            registry.in_flight.add([pretend("mine", handle)])
            ok = ResultEnvelope("mine", "success", b"y").to_header()
            forged = Frame(
                {
                    "v": 1,
                    "kind": "result",
                    "items": [{**ok, "task_id": "someone-elses"}, ok],
                    "sizes": [1, 1],
                },
                b"xy",
            )
            handle._on_frame(forged)
            registry.in_flight.add([pretend("junk", handle)])
            junk = Frame(
                {"v": 1, "kind": "result", "items": [{"task_id": "junk", "x": 1}], "sizes": [3]},
                b"abc",
            )
            handle._on_frame(junk)

    run(scenario)
    assert [(h["task_id"], p) for _u, h, p in rec.results] == [("mine", b"y"), ("junk", b"")]
    assert rec.results[1][1]["error"]["reason"] == "task.envelope_invalid"


def test_limits_per_account_in_total_and_on_concurrent_starts(
    settings: SpawnSettings, make_account: Any
) -> None:
    alice, bob = account_of(make_account()), account_of(make_account())
    rec = Recorder()

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        registry = make_registry(
            settings, rec, max_per_account=1, max_total=2, max_concurrent_starts=1
        )
        try:
            first = asyncio.ensure_future(registry.get_or_start(request(alice, "a1")))
            await asyncio.sleep(0)  # let the first start begin
            with pytest.raises(SpawnError) as starts:
                await registry.get_or_start(request(bob, "b1"))
            out["starts"] = starts.value.reason
            await first
            with pytest.raises(SpawnError) as per_account:
                await registry.get_or_start(request(alice, "a2"))
            out["per_account"] = per_account.value.reason
            await registry.get_or_start(request(bob, "b1"))
            carol_like = request(bob, "b2")
            with pytest.raises(SpawnError) as total:
                await registry.get_or_start(carol_like)
            out["total"] = total.value.reason
            out["stopped"] = await registry.stop(alice.name)
            out["after_stop"] = [s.account for s in registry.status()]
        finally:
            await registry.shutdown()
        with pytest.raises(SpawnError) as closed:
            await registry.get_or_start(request(alice, "a1"))
        out["closed"] = closed.value.reason
        return out

    out = run(scenario)
    assert out == {
        "starts": "spawn.too_many_starts",
        "per_account": "spawn.too_many_endpoints",
        "total": "spawn.too_many_endpoints",
        "stopped": 1,
        "after_stop": [bob.name],
        "closed": "spawn.shutting_down",
    }
    assert processes_of(alice.uid) == [] and processes_of(bob.uid) == []


def test_a_failed_start_reaches_every_waiter_once(
    settings: SpawnSettings, make_account: Any
) -> None:
    account = account_of(make_account())
    rec = Recorder()
    spawned: list[int] = []

    async def scenario() -> list[BaseException | Any]:
        registry = make_registry(settings, rec)
        bad = request(account, "bad", setup="exit 3")
        try:
            results = await asyncio.gather(
                *(registry.get_or_start(bad) for _ in range(3)), return_exceptions=True
            )
            spawned.extend(s.pid for s in registry.status() if s.pid)
            return results
        finally:
            await registry.shutdown()

    results = run(scenario)
    assert [getattr(r, "reason", r) for r in results] == ["spawn.start_failed"] * 3
    assert results[0] is results[1] is results[2]  # one start, one error
    assert spawned == []
    assert processes_of(account.uid) == []


def test_shutdown_drains_in_flight_tasks_before_stopping(
    settings: SpawnSettings, make_account: Any
) -> None:
    from mepcore.tasks import TaskEnvelope, pack_args, pack_function

    account = account_of(make_account())
    rec = Recorder()
    fid, body = pack_function(
        _by_value("def nap(x):\n    import time\n    time.sleep(0.3)\n    return x\n", "nap")
    )

    async def scenario() -> None:
        registry = make_registry(settings, rec)
        handle = await registry.get_or_start(request(account, engine="ProcessPoolEngine"))
        handle.register_function(fid, body)
        tasks = [TaskEnvelope(f"n{i}", fid, pack_args((i,), {})) for i in range(4)]
        handle.dispatch([dispatch_task(t) for t in tasks])
        await registry.shutdown()
        assert handle.exit_reason == "drained"

    run(scenario)
    assert sorted(h["task_id"] for _u, h, _p in rec.results) == ["n0", "n1", "n2", "n3"]
    assert all(h["status"] == "success" for _u, h, _p in rec.results)
    assert rec.lost == []
    assert processes_of(account.uid) == []


def zombie_children_of_uid(uid: int) -> list[int]:
    """Zombies whose parent is this (test, i.e. daemon) process and that ran as ``uid``."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                raw = fh.read()
            fields = raw[raw.rfind(b")") + 2 :].split()
            if (
                fields[0] == b"Z"
                and int(fields[1]) == me
                and os.stat(f"/proc/{entry}").st_uid == uid
            ):
                found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


def test_orphans_of_a_user_endpoint_are_reaped_not_left_as_zombies(
    settings: SpawnSettings, make_account: Any
) -> None:
    """The daemon is a subreaper: a descendant of a user endpoint whose parent has gone is
    re-parented to it, and must be reaped when it dies (not pile up as a zombie)."""
    account = account_of(make_account())
    rec = Recorder()
    # The subshell forks a short-lived child and exits at once: the child is orphaned
    # while alive and dies as the daemon's (adopted) child.
    setup = "for i in 1 2 3 4 5; do ( /bin/sleep 0.05 & ); done"

    async def scenario() -> list[int]:
        async with serving(settings, rec) as registry:
            handle = await registry.get_or_start(request(account, setup=setup))
            assert handle.state == "ready"
            # Poll until the user endpoint is the account's only process (zombies count):
            # the orphans have then died and been reaped (or the deadline passes).
            deadline = time.monotonic() + 10
            while processes_of(account.uid) != [handle.pid] and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # a poll interval, not a wait for a process
            assert processes_of(account.uid) == [handle.pid]
            # And the adopted ones were really ours to reap: reaping again finds nothing.
            assert registry.reap_adopted() == []
            return zombie_children_of_uid(account.uid)

    assert run(scenario) == []
    assert processes_of(account.uid) == []


def test_caps_hold_under_concurrent_starts_of_distinct_configs(
    settings: SpawnSettings, make_account: Any
) -> None:
    """Many distinct configs started at once, with several starts allowed in parallel:
    the per-account and total caps count starts in progress, so the registry never
    holds more user endpoints than they allow."""
    alice, bob = account_of(make_account()), account_of(make_account())
    rec = Recorder()

    async def scenario() -> tuple[list[str], int, int]:
        registry = make_registry(
            settings, rec, max_per_account=2, max_total=3, max_concurrent_starts=8
        )
        most = 0

        def count() -> None:
            nonlocal most
            live = [s for s in registry.status() if s.state in ("starting", "ready")]
            most = max(most, len(live))

        try:
            starts = [request(alice, f"a{i}") for i in range(5)]
            starts += [request(bob, f"b{i}") for i in range(5)]
            outcomes = await asyncio.gather(
                *(registry.get_or_start(r) for r in starts), return_exceptions=True
            )
            count()
            refused = [o.reason for o in outcomes if isinstance(o, SpawnError)]
            per_account = max(
                sum(1 for s in registry.status() if s.account == who.name) for who in (alice, bob)
            )
            return refused, per_account, most
        finally:
            await registry.shutdown()

    refused, per_account, most = run(scenario)
    assert len(refused) == 7 and set(refused) == {"spawn.too_many_endpoints"}
    assert per_account <= 2
    assert most <= 3
    assert processes_of(alice.uid) == [] and processes_of(bob.uid) == []


def _config_lines(account: Account) -> list[str]:
    from mepd.uep.log import log_path

    with open(log_path(account.home, "default"), encoding="utf-8") as fh:
        return [line for line in fh if "] config: " in line]


def test_a_start_from_the_same_inputs_uses_the_configuration_rendered_before(
    settings: SpawnSettings, make_account: Any
) -> None:
    alice, bob = account_of(make_account()), account_of(make_account())
    rec = Recorder()

    async def scenario() -> list[tuple[str, int]]:
        registry = make_registry(settings, rec)
        seen: list[tuple[str, int]] = []
        try:
            for account, period in ((alice, 0.05), (alice, 0.05), (alice, 0.5)):
                handle = await registry.get_or_start(request(account, period=period))
                seen.append((handle.account.name, len(registry.render_cache)))
                await registry.stop(account.name)
            # What alice's endpoint rendered is never handed to another account: bob's
            # first start from the very same template and variables renders.
            await registry.get_or_start(request(bob))
            seen.append((bob.name, len(registry.render_cache)))
        finally:
            await registry.shutdown()
        return seen

    seen = run(scenario)
    assert seen == [(alice.name, 1), (alice.name, 1), (alice.name, 2), (bob.name, 3)]
    alice_lines = _config_lines(alice)
    assert len(alice_lines) == 3
    assert "as rendered before" not in alice_lines[0]
    assert "as rendered before" in alice_lines[1]
    assert "as rendered before" not in alice_lines[2]  # other variables: rendered again
    assert ["as rendered before" in line for line in _config_lines(bob)] == [False]
    assert processes_of(alice.uid) == [] and processes_of(bob.uid) == []


def test_a_kept_configuration_that_is_no_longer_valid_is_rendered_again(
    settings: SpawnSettings, make_account: Any
) -> None:
    account = account_of(make_account())
    rec = Recorder()

    async def scenario() -> None:
        async with serving(settings, rec) as registry:
            await registry.get_or_start(request(account))
            await registry.stop(account.name)
            ((key, kept),) = registry.render_cache._kept.items()
            # As a configuration of another mep version might be: not valid here.
            registry.render_cache._kept[key] = {**kept, "no_such_key": 1}
            handle = await registry.get_or_start(request(account))
            assert handle.state == "ready"
            assert registry.render_cache._kept[key] == kept  # the fresh rendering is kept

    run(scenario)
    lines = _config_lines(account)
    assert ["as rendered before" in line for line in lines] == [False, False]
