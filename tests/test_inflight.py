"""The in-flight table: one record per task, every count derived from it; and the
pipeline keeps no memory of user endpoints beyond the tasks in flight."""

from __future__ import annotations

import asyncio
import gc
import weakref
from pathlib import Path

import httpx

from mepd.inflight import InFlight, InFlightTask
from tests.daemon_harness import PipelineKit, b64
from tests.test_api_pipeline import run


def record(task_id: str, account: str = "alice", endpoint: str | None = "e1") -> InFlightTask:
    return InFlightTask(task_id, f"owner-{account}", account, "f" * 64, endpoint, 1.0)


def test_counts_follow_adds_and_takes() -> None:
    table = InFlight()
    table.add([record("a"), record("b"), record("c", "bob", "e2"), record("q", "bob", None)])
    assert len(table) == 4
    assert table.count_account("alice") == 2 and table.count_account("bob") == 2
    assert table.count_endpoint("e1") == 2 and table.count_endpoint("e2") == 1
    assert table.dispatched() == 3  # the queued one is not out at an endpoint
    assert table.by_account() == {"alice": 2, "bob": 2}
    taken = table.take("a")
    assert taken is not None and taken.task_id == "a"
    assert table.take("a") is None  # exactly once
    assert table.count_account("alice") == 1 and table.count_endpoint("e1") == 1
    assert [r.task_id for r in table.take_endpoint("e2")] == ["c"]
    assert table.count_endpoint("e2") == 0 and table.count_account("bob") == 1
    assert table.by_account() == {"alice": 1, "bob": 1}


def test_a_task_is_taken_only_by_the_endpoint_it_runs_on() -> None:
    table = InFlight()
    table.add([record("a", endpoint="e1")])
    assert table.take("a", endpoint_id="e2") is None
    assert table.get("a") is not None
    assert table.take("a", endpoint_id="e1") is not None
    assert len(table) == 0


def test_a_queued_task_dispatched_again_is_one_record() -> None:
    table = InFlight()
    table.add([record("q", endpoint=None)])
    table.add([record("q", endpoint="e9")])
    assert len(table) == 1 and table.count_account("alice") == 1
    assert table.count_endpoint("e9") == 1 and table.dispatched() == 1
    assert table.take_endpoint("e9")[0].task_id == "q"
    assert len(table) == 0 and table.by_account() == {}


def test_the_pipeline_forgets_a_user_endpoint_once_it_is_gone(tmp_path: Path) -> None:
    """A handle the registry dropped is not kept alive by the pipeline (no per-endpoint
    memory that grows with every start and exit)."""

    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        alice = {"Authorization": f"Bearer {kit.token('alice@example.org')}"}
        r = await client.post("/v1/functions", headers=alice, json={"function": b64(b"fn")})
        fid = r.json()["function_id"]
        body = {"tasks": [{"function_id": fid, "args": b64(b"x")}]}
        r = await client.post("/v1/endpoints/hpc/submit", headers=alice, json=body)
        task_id = r.json()["task_ids"][0]
        w = await client.post(
            "/v1/tasks/wait", headers=alice, json={"task_ids": [task_id], "timeout": 10}
        )
        assert w.json()["tasks"][0]["state"] == "success"
        (handle,) = kit.endpoints.handles.values()
        gone = weakref.ref(handle)
        kit.endpoints.handles.clear()
        del handle
        gc.collect()
        assert gone() is None
        assert len(kit.pipeline.in_flight) == 0

    run(tmp_path, scenario)


def test_a_result_from_another_endpoint_is_refused(tmp_path: Path) -> None:
    """Only the user endpoint a task went to can finish it."""

    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        kit.endpoints.hold = True
        alice = {"Authorization": f"Bearer {kit.token('alice@example.org')}"}
        r = await client.post("/v1/functions", headers=alice, json={"function": b64(b"fn")})
        fid = r.json()["function_id"]
        body = {"tasks": [{"function_id": fid, "args": b64(b"x")}]}
        r = await client.post("/v1/endpoints/hpc/submit", headers=alice, json=body)
        task_id = r.json()["task_ids"][0]
        (handle,) = kit.endpoints.handles.values()
        impostor = type(handle)(kit.pipeline, "other", "alice")
        impostor.result(task_id, {"task_id": task_id, "status": "success"}, b"forged")
        await asyncio.sleep(0)
        view = (await client.get(f"/v1/tasks/{task_id}", headers=alice)).json()
        assert view["state"] == "running"
        handle.complete(handle.held[0])
        w = await client.post(
            "/v1/tasks/wait", headers=alice, json={"task_ids": [task_id], "timeout": 10}
        )
        assert w.json()["tasks"][0]["state"] == "success"

    run(tmp_path, scenario)
