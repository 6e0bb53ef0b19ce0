"""Cancel, end to end as root: a real ``mepd serve``, a real account, a real user endpoint
on each engine (threads, a process pool, Parsl's HighThroughputExecutor with a local
provider). A task waiting in the user endpoint and a running ``sleep(30)`` are both
cancelled; the running one's worker is stopped and replaced (the next task runs); a
finished task is not changed by a cancel."""

from __future__ import annotations

import base64
import pwd
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mepcore.tasks import pack_args, pack_function, unpack_value
from tests.accounts import alive
from tests.daemon_harness import RunningDaemon, daemon_with_accounts, remote_function
from tests.test_client_fakes import wait_until

pytestmark = [pytest.mark.root, pytest.mark.slow]

TEMPLATE = """\
engine:
  type: {{ engine }}
{%- if engine == '"GlobusComputeEngine"' %}
  max_workers_per_node: 1
  heartbeat_period: 1
  heartbeat_threshold: 4
  job_status_kwargs: {strategy_period: 0.2}
  provider:
    type: LocalProvider
    init_blocks: 1
    min_blocks: 0
    max_blocks: 1
{%- else %}
  max_workers: 1
{%- endif %}
idle_heartbeats_soft: 30
idle_heartbeats_hard: 5760
"""
SCHEMA = (
    '{"type": "object", "additionalProperties": false, "properties": {"engine": '
    '{"enum": ["ThreadPoolEngine", "ProcessPoolEngine", "GlobusComputeEngine"]}}}'
)
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

def pid():
    return os.getpid()
"""
NAP = remote_function(SOURCE, "nap")
PID = remote_function(SOURCE, "pid")
ENGINES = ("ThreadPoolEngine", "ProcessPoolEngine", "GlobusComputeEngine")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningDaemon, Any]]:
    top = tmp_path_factory.mktemp("cancel") / "site"
    with daemon_with_accounts(top, template=TEMPLATE, schema=SCHEMA) as (daemon, accounts):
        yield daemon, accounts[0]


def _register(client: Any, fn: Any) -> str:
    fid, body = pack_function(fn)
    r = client.post("/v1/functions", json={"function": b64(body)})
    assert r.status_code == 200, r.text
    return fid


def _submit(client: Any, engine: str, fid: str, *args: Any) -> str:
    r = client.post(
        "/v1/endpoints/hpc/submit",
        json={
            "user_endpoint_config": {"engine": engine},
            "tasks": [{"function_id": fid, "args": b64(pack_args(args, {}))}],
        },
    )
    assert r.status_code == 200, r.text
    return str(r.json()["task_ids"][0])


def _final(client: Any, task_id: str, deadline: float) -> dict[str, Any]:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        r = client.post("/v1/tasks/wait", json={"task_ids": [task_id], "timeout": 2})
        r.raise_for_status()
        if r.json()["tasks"]:
            return dict(r.json()["tasks"][0])
    raise AssertionError(f"task {task_id} not final after {deadline} s")


@pytest.mark.parametrize("engine", ENGINES)
def test_cancel_stops_a_waiting_and_a_running_task_on_each_engine(
    deployment: tuple[RunningDaemon, pwd.struct_passwd], engine: str
) -> None:
    daemon, account = deployment
    client = daemon.client(daemon.token(f"{account.pw_name}@example.org"))
    nap, pid = _register(client, NAP), _register(client, PID)
    # The function writes where root can read it: the account's own home.
    marker = Path(account.pw_dir) / f"nap-{engine}.pid"
    marker.unlink(missing_ok=True)
    endpoint_pid = _final(client, _submit(client, engine, pid), 120)
    assert endpoint_pid["state"] == "success", endpoint_pid
    running = _submit(client, engine, nap, str(marker), 30)
    waiting = _submit(client, engine, nap, str(marker) + ".never", 30)
    wait_until(lambda: marker.exists() and marker.read_text().isdigit(), 60, "the nap started")
    worker = int(marker.read_text())

    # Waiting in the user endpoint (one worker, busy): cancelled, it never runs.
    r = client.delete(f"/v1/tasks/{waiting}")
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "cancelled"
    # Running: cancelled at once, and its worker is stopped within 5 s (threads cannot
    # be killed: their slot is given to a new thread instead, see threads.py).
    r = client.delete(f"/v1/tasks/{running}")
    assert r.status_code == 200, r.text
    view = r.json()
    assert view["state"] == "cancelled"
    assert view["error"]["reason"] == "task.cancelled"
    if engine != "ThreadPoolEngine":
        wait_until(lambda: not alive(worker), 5, f"worker {worker} stopped")
    # The next task runs on a worker that replaced it.
    after = _final(client, _submit(client, engine, pid), 60)
    assert after["state"] == "success", after
    if engine != "ThreadPoolEngine":
        assert unpack_value(base64.b64decode(after["result"])) != worker
    assert not Path(str(marker) + ".never").exists()
    # The cancelled tasks stay cancelled (their late answers are dropped); a finished
    # task is not changed by a cancel.
    for task_id in (running, waiting):
        assert client.get(f"/v1/tasks/{task_id}").json()["state"] == "cancelled"
    r = client.delete(f"/v1/tasks/{endpoint_pid['task_id']}")
    assert r.status_code == 200
    assert r.json()["state"] == "success"
    assert r.json()["result"] == endpoint_pid["result"]
