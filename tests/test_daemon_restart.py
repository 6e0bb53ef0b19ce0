"""Restart after ``kill -9``: every accepted task id has a result or task.endpoint_lost;
tasks accepted but not dispatched are dispatched after the restart."""

from __future__ import annotations

import base64
import pwd
import time
from pathlib import Path
from typing import Any

import pytest

from mepcore.tasks import pack_args, pack_function, unpack_value
from mepd.store import NewTask, TaskStore
from tests.accounts import processes_of
from tests.daemon_harness import remote_function, start_daemon, wait_all, write_runtime_deployment

pytestmark = [pytest.mark.root, pytest.mark.slow]

SLOW = remote_function("def slow(s):\n    import time\n    time.sleep(s)\n    return s\n", "slow")
ECHO = remote_function("def echo(x):\n    return x\n", "echo")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_kill_9_then_restart_loses_nothing(tmp_path: Path, make_account: Any) -> None:
    acct: pwd.struct_passwd = make_account()
    config = write_runtime_deployment(tmp_path / "site")
    state = tmp_path / "site" / "state"
    daemon = start_daemon(config, state)
    try:
        client = daemon.client(daemon.token(f"{acct.pw_name}@example.org"))
        fids = {}
        for fn in (SLOW, ECHO):
            fid, body = pack_function(fn)
            assert client.post("/v1/functions", json={"function": b64(body)}).status_code == 200
            fids[fn.__name__] = fid
        variables = {"max_workers": 1}
        done_ids = client.post(
            "/v1/endpoints/hpc/submit",
            json={
                "user_endpoint_config": variables,
                "tasks": [
                    {"function_id": fids["echo"], "args": b64(pack_args((i,), {}))}
                    for i in range(5)
                ],
            },
        ).json()["task_ids"]
        finished = wait_all(client, done_ids)
        assert all(v["state"] == "success" for v in finished.values())
        # One running (max_workers 1) and two waiting inside the user endpoint.
        slow_ids = client.post(
            "/v1/endpoints/hpc/submit",
            json={
                "user_endpoint_config": variables,
                "tasks": [
                    {"function_id": fids["slow"], "args": b64(pack_args((60,), {}))}
                    for _ in range(3)
                ],
            },
        ).json()["task_ids"]
        assert len(slow_ids) == 3
    finally:
        daemon.kill()

    # The user endpoint dies with its daemon (parent-death signal): poll, bounded.
    end = time.monotonic() + 30
    while processes_of(acct.pw_uid) and time.monotonic() < end:
        time.sleep(0.05)
    assert processes_of(acct.pw_uid) == []

    # While the daemon is down, simulate tasks that were committed but never dispatched
    # (a crash between the commit and the dispatch): they must run after the restart.
    store = TaskStore.open(state / "tasks.sqlite3")
    template = store.get(done_ids[0])
    assert template is not None
    queued = [
        NewTask(
            f"queued-{i}",
            template.owner,
            "hpc",
            acct.pw_name,
            template.spec_id,
            fids["echo"],
            pack_args((100 + i,), {}),
            None,
        )
        for i in range(3)
    ]
    store.add_tasks(queued, state="queued", now=time.time())
    store.close()

    daemon = start_daemon(config, state, log_name="mepd-2.log")
    try:
        client = daemon.client(daemon.token(f"{acct.pw_name}@example.org"))
        every = done_ids + slow_ids + [q.task_id for q in queued]
        views = wait_all(client, every, deadline=120)
        assert set(views) == set(every), daemon.stderr()[-3000:]
        for task_id in done_ids:
            assert views[task_id]["state"] == "success"
        for task_id in slow_ids:
            assert views[task_id]["state"] == "failed"
            assert views[task_id]["error"]["reason"] == "task.endpoint_lost"
        for i, q in enumerate(queued):
            assert views[q.task_id]["state"] == "success", views[q.task_id]
            assert unpack_value(base64.b64decode(views[q.task_id]["result"])) == 100 + i
        # And new work is accepted.
        r = client.post(
            "/v1/endpoints/hpc/submit",
            json={"tasks": [{"function_id": fids["echo"], "args": b64(pack_args(("new",), {}))}]},
        )
        assert r.status_code == 200, r.text
        (new_id,) = r.json()["task_ids"]
        view = wait_all(client, [new_id])[new_id]
        assert unpack_value(base64.b64decode(view["result"])) == "new"
    finally:
        assert daemon.stop() == 0
    # A clean stop leaves no process of the account.
    end = time.monotonic() + 30
    while processes_of(acct.pw_uid) and time.monotonic() < end:
        time.sleep(0.05)
    assert processes_of(acct.pw_uid) == []


def test_sigterm_drains_in_flight_tasks_before_stopping(tmp_path: Path, make_account: Any) -> None:
    acct: pwd.struct_passwd = make_account()
    config = write_runtime_deployment(tmp_path / "site")
    state = tmp_path / "site" / "state"
    daemon = start_daemon(config, state)
    try:
        client = daemon.client(daemon.token(f"{acct.pw_name}@example.org"))
        fid, body = pack_function(SLOW)
        client.post("/v1/functions", json={"function": b64(body)}).raise_for_status()
        r = client.post(
            "/v1/endpoints/hpc/submit",
            json={
                "user_endpoint_config": {"max_workers": 2},
                "tasks": [{"function_id": fid, "args": b64(pack_args((1.5,), {}))}] * 2,
            },
        )
        ids = r.json()["task_ids"]
        # Both are running once the user endpoint reports them in flight.
        end = time.monotonic() + 60
        while time.monotonic() < end:
            eps = client.get("/v1/endpoints/hpc/status").json()["user_endpoints"]
            if eps and eps[0]["in_flight"] == 2:
                break
            time.sleep(0.05)
    finally:
        assert daemon.stop() == 0  # SIGTERM: drain (10 s allowed), then stop
    store = TaskStore.open(state / "tasks.sqlite3")
    records = {r.task_id: r for r in store.get_many(ids)}
    store.close()
    assert [records[i].state for i in ids] == ["success", "success"]
    assert unpack_value(records[ids[0]].result or b"") == 1.5
    end = time.monotonic() + 30
    while processes_of(acct.pw_uid) and time.monotonic() < end:
        time.sleep(0.05)
    assert processes_of(acct.pw_uid) == []
