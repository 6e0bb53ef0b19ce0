"""The ``Executor`` and ``Client`` against mepd's real HTTP API and pipeline, with the user
endpoints faked in-process (``test_client_fakes``). The same behaviours through a real
``mepd serve`` and real user endpoints are in ``test_client_daemon.py``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import CancelledError, as_completed
from pathlib import Path

import httpx
import pytest

from mepcore.client import (
    Client,
    Executor,
    RemoteException,
    RequestRefused,
    TaskInfrastructureError,
    pack_args,
    pack_function,
)
from mepd.auth import local_identity_id
from mepd.store import NewTask
from tests.test_client_fakes import FakeDaemon, LoseTask, fake_daemon, wait_until

REPO = Path(__file__).resolve().parents[1]
RELEASE = threading.Event()


def square(x: int) -> int:
    return x * x


def add(x: int, y: int = 0) -> int:
    return x + y


def fail(x: int) -> int:
    raise ValueError(f"no good: {x}")


def lose(reason: str) -> None:
    raise LoseTask(reason)


def held(x: int) -> int:
    RELEASE.wait(60)
    return x


class CountingTransport(httpx.HTTPTransport):
    """Counts requests by (method, path); can hold submit requests until released."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[tuple[str, str]] = Counter()
        self.gate = threading.Event()
        self.gate.set()
        self.holding = threading.Event()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        key = (request.method, request.url.path)
        self.counts[key] += 1
        if request.url.path.endswith("/submit") and not self.gate.is_set():
            self.holding.set()
            self.gate.wait(60)
        return super().handle_request(request)

    def count(self, suffix: str) -> int:
        return sum(n for (_, path), n in self.counts.items() if path.endswith(suffix))


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[FakeDaemon]:
    with fake_daemon(tmp_path / "state") as running:
        yield running


@pytest.fixture
def transport() -> CountingTransport:
    return CountingTransport()


@pytest.fixture
def client(daemon: FakeDaemon, transport: CountingTransport) -> Iterator[Client]:
    with Client(daemon.url, daemon.token(), transport=transport) as c:
        yield c


# -- Executor -------------------------------------------------------------------------


def test_ten_thousand_futures_have_correct_results_in_few_requests(
    client: Client, transport: CountingTransport
) -> None:
    with Executor("hpc", client=client) as ex:
        futures = [ex.submit(square, i) for i in range(10_000)]
    assert [f.result(0) for f in futures] == [i * i for i in range(10_000)]
    assert transport.count("/v1/functions") == 1  # registered once, referred to by id
    assert transport.count("/submit") < 1_000  # batched
    assert transport.count("/v1/tasks/wait") < 1_000  # one poll serves many futures
    assert all(f.task_id for f in futures)


def test_map_returns_results_in_order(client: Client) -> None:
    with Executor("hpc", client=client) as ex:
        assert list(ex.map(add, range(50), range(100, 150))) == [
            a + b for a, b in zip(range(50), range(100, 150), strict=True)
        ]
        assert list(ex.map(square, [])) == []


def test_keyword_arguments_and_several_functions(client: Client) -> None:
    with Executor("hpc", client=client) as ex:
        assert ex.submit(add, 1, y=2).result(30) == 3
        assert ex.submit(lambda s: s.upper(), "mep").result(30) == "MEP"


def test_remote_exception_carries_type_message_and_traceback(client: Client) -> None:
    with Executor("hpc", client=client) as ex:
        future = ex.submit(fail, 7)
        exc = future.exception(30)
    assert isinstance(exc, RemoteException)
    assert (exc.type_name, exc.message, exc.reason) == ("ValueError", "no good: 7", "task.failed")
    assert "in fail" in exc.traceback and "ValueError: no good: 7" in exc.traceback
    assert exc.task_id == future.task_id
    with pytest.raises(RemoteException, match="ValueError: no good: 7"):
        future.result()


@pytest.mark.parametrize("reason", ["task.worker_lost", "task.timeout", "task.endpoint_lost"])
def test_infrastructure_failures_raise_a_distinct_type(client: Client, reason: str) -> None:
    with Executor("hpc", client=client) as ex:
        lost = ex.submit(lose, reason)
        fine = ex.submit(square, 3)
        with pytest.raises(TaskInfrastructureError) as info:
            lost.result(30)
        assert fine.result(30) == 9
    assert info.value.reason == reason and not isinstance(info.value, RemoteException)


def test_cancel_before_dispatch_never_reaches_the_daemon(
    daemon: FakeDaemon, client: Client, transport: CountingTransport
) -> None:
    transport.gate.clear()
    ex = Executor("hpc", client=client)
    try:
        first = ex.submit(square, 1)
        assert transport.holding.wait(30)  # the first batch is on the wire, held
        queued = [ex.submit(square, i) for i in range(2, 6)]
        assert first.cancel() is False  # being sent: too late
        assert queued[1].cancel() and queued[3].cancel()
        assert queued[1].cancelled() and queued[1].done()
    finally:
        transport.gate.set()
        ex.shutdown(wait=True)
    assert first.result() == 1
    assert [queued[0].result(), queued[2].result()] == [4, 16]
    with pytest.raises(CancelledError):
        queued[1].result()
    assert len(daemon.endpoints.dispatched) == 3
    assert set(as_completed([*queued, first], timeout=5)) == {*queued, first}


def test_shutdown_with_cancel_futures_cancels_what_is_not_sent(
    daemon: FakeDaemon, client: Client, transport: CountingTransport
) -> None:
    transport.gate.clear()
    ex = Executor("hpc", client=client)
    first = ex.submit(square, 2)
    assert transport.holding.wait(30)
    rest = [ex.submit(square, i) for i in range(20)]
    releaser = threading.Timer(0.2, transport.gate.set)
    releaser.start()
    ex.shutdown(wait=True, cancel_futures=True)
    releaser.join()
    assert first.result() == 4
    assert all(f.cancelled() for f in rest)
    assert len(daemon.endpoints.dispatched) == 1


def test_cancel_of_a_task_queued_in_the_daemon_and_of_a_running_one(
    daemon: FakeDaemon, client: Client
) -> None:
    # A task the daemon holds in its queue (as after a restart) can be cancelled...
    fid = client.register_function(square)
    queued = str(uuid.uuid4())
    owner = f"mepd-local|{local_identity_id('alice@example.org')}"
    daemon.kit.pipeline.store.add_tasks(
        [NewTask(queued, owner, "hpc", "alice", "spec", fid, pack_args((1,), {}), None)],
        state="queued",
        now=time.time(),
    )
    assert client.cancel(queued) is True
    assert client.get_task(queued).state == "cancelled"
    # ...and so can one already handed to its user endpoint (the endpoint is told).
    RELEASE.clear()
    try:
        running = client.submit("hpc", client.register_function(held), (5,))
        assert client.cancel(running) is True
    finally:
        RELEASE.set()
    assert client.get_task(running).state == "cancelled"


def test_each_user_endpoint_config_gets_its_own_user_endpoint(
    daemon: FakeDaemon, client: Client
) -> None:
    with Executor("hpc", {"workers": 1}, client=client) as ex:
        small = [ex.submit(square, i) for i in range(20)]
        ex.user_endpoint_config = {"workers": 2, "queue": "short"}
        big = [ex.submit(square, i) for i in range(20)]
        ex.user_endpoint_config = {"workers": 1}
        again = ex.submit(square, 9)
    assert [f.result() for f in small + big] == [i * i for i in range(20)] * 2
    assert again.result() == 81
    assert sorted(s.spec.variables["workers"] for s in daemon.endpoints.starts) == [1, 2]
    assert len({s.config_key for s in daemon.endpoints.starts}) == 2


def test_invalid_variables_fail_the_futures_with_the_servers_violations(client: Client) -> None:
    with Executor("hpc", {"workers": 99, "colour": "red"}, client=client) as ex:
        futures = [ex.submit(square, i) for i in range(3)]
    for future in futures:
        exc = future.exception(30)
        assert isinstance(exc, RequestRefused)
        assert (exc.status, exc.reason) == (422, "config.invalid_variables")
        assert {v.path for v in exc.violations} >= {"$.workers"}


def test_a_refused_function_does_not_fail_the_others_in_its_batch(
    daemon: FakeDaemon, client: Client, transport: CountingTransport
) -> None:
    allowed_id, _ = pack_function(square)
    daemon.kit.site.allowed_functions = frozenset({allowed_id})
    transport.gate.clear()
    ex = Executor("hpc", client=client)
    try:
        warmup = ex.submit(square, 0)
        assert transport.holding.wait(30)
        mixed = [ex.submit(square if i % 2 else add, i) for i in range(10)]
    finally:
        transport.gate.set()
        ex.shutdown(wait=True)
    assert warmup.result() == 0
    for i, future in enumerate(mixed):
        if i % 2:
            assert future.result() == i * i
        else:
            exc = future.exception()
            assert isinstance(exc, RequestRefused)
            assert (exc.status, exc.reason) == (403, "task.function_not_allowed")


def test_an_unmapped_identity_is_refused_with_the_reason(daemon: FakeDaemon) -> None:
    with Executor("hpc", url=daemon.url, token=daemon.token("mallory@example.org")) as ex:
        exc = ex.submit(square, 2).exception(30)
    assert isinstance(exc, RequestRefused)
    assert (exc.status, exc.reason) == (403, "identity.no_mapping")


def test_a_bad_token_is_a_401(daemon: FakeDaemon) -> None:
    with Executor("hpc", url=daemon.url, token="not-a-token") as ex:
        exc = ex.submit(square, 2).exception(30)
    assert isinstance(exc, RequestRefused) and exc.status == 401
    assert exc.reason.startswith("auth.")


def test_daemon_restart_fails_lost_tasks_with_the_reason_and_the_rest_complete(
    daemon: FakeDaemon, client: Client
) -> None:
    RELEASE.clear()
    try:
        with Executor("hpc", client=client) as ex:
            before = [ex.submit(square, i) for i in range(100)]
            assert [f.result(30) for f in before] == [i * i for i in range(100)]
            stuck = [ex.submit(held, i) for i in range(5)]
            wait_until(lambda: len(daemon.endpoints.dispatched) == 105)
            daemon.restart()
            after = [ex.submit(square, i) for i in range(100)]
            assert [f.result(30) for f in after] == [i * i for i in range(100)]
            for future in stuck:
                exc = future.exception(30)
                assert isinstance(exc, TaskInfrastructureError)
                assert exc.reason == "task.endpoint_lost"
        assert [f.result() for f in before] == [i * i for i in range(100)]
    finally:
        RELEASE.set()


def test_an_expired_task_fails_as_not_found(daemon: FakeDaemon, client: Client) -> None:
    RELEASE.clear()
    try:
        with Executor("hpc", client=client) as ex:
            future = ex.submit(held, 1)
            wait_until(lambda: future.task_id is not None)
            # The record disappears (as a retention sweep removes old results) while
            # the task still runs; when it finishes, the long-poll finds no record.
            daemon.kit.pipeline.store._db.execute("DELETE FROM tasks")
            RELEASE.set()
            exc = future.exception(30)
    finally:
        RELEASE.set()
    assert isinstance(exc, TaskInfrastructureError) and exc.reason == "task.not_found"


# -- Client ---------------------------------------------------------------------------


def test_client_round_trip_status_and_stop(daemon: FakeDaemon, client: Client) -> None:
    fid = client.register_function(square)
    assert client.register_function(square) == fid == pack_function(square)[0]
    ids = [client.submit("hpc", fid, (i,)) for i in range(3)]
    assert [client.get_result(t, timeout=30) for t in ids] == [0, 1, 4]
    done = client.wait(ids, timeout=1)
    assert {r.task_id for r in done} == set(ids) and all(r.state == "success" for r in done)
    assert client.get_task(ids[0]).outcome() == 0
    status = client.status("hpc")
    assert [e["state"] for e in status["user_endpoints"]] == ["ready"]
    assert client.stop("hpc") == {"stopped": 1}
    with pytest.raises(RequestRefused) as info:
        client.status("nowhere")
    assert (info.value.status, info.value.reason) == (404, "api.endpoint_unknown")
    with pytest.raises(RequestRefused) as info:
        client.get_task(str(uuid.uuid4()))
    assert info.value.reason == "task.not_found"


def test_get_result_times_out(client: Client) -> None:
    RELEASE.clear()
    try:
        task = client.submit("hpc", client.register_function(held), (1,))
        with pytest.raises(TimeoutError):
            client.get_result(task, timeout=0.3)
    finally:
        RELEASE.set()


# -- the process exits cleanly --------------------------------------------------------

EXIT_SCRIPT = textwrap.dedent(
    """
    import sys, threading
    from mepcore.client import Executor
    url, token, mode = sys.argv[1:4]
    ex = Executor("hpc", url=url, token=token)
    futures = [ex.submit(pow, 2, i) for i in range(500)]
    if mode == "wait":
        ex.shutdown(wait=True)
        assert [f.result() for f in futures] == [2 ** i for i in range(500)]
        assert not [t for t in threading.enumerate() if t.name.startswith("mep-")]
    elif mode == "nowait":
        ex.shutdown(wait=False)
    print("bye", mode)
    """
)


@pytest.mark.parametrize("mode", ["wait", "nowait", "no-shutdown"])
def test_the_client_process_exits_promptly(daemon: FakeDaemon, tmp_path: Path, mode: str) -> None:
    script = tmp_path / "exit_check.py"
    script.write_text(EXIT_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "MEP_TOKEN"}
    done = subprocess.run(
        [sys.executable, str(script), daemon.url, daemon.token(), mode],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=str(REPO),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"bye {mode}"
