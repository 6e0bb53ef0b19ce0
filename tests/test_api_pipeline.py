"""The HTTP API and the request pipeline, in process, with fakes for the site's components.

Real: Starlette app, local-issuer tokens, SQLite store, audit log. Fake: mapping, policy,
variable validation and user endpoints (see tests/daemon_harness.py).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mepcore.errors import REASONS
from mepd.api import json_depth_ok, openapi_text
from mepd.settings import Limits
from tests.daemon_harness import (
    REPO,
    BrokenAudit,
    PipelineKit,
    Scenario,
    b64,
    make_pipeline,
    serve_pipeline,
)

ALICE = "alice@example.org"
BOB = "bob@example.org"


def run(tmp_path: Path, scenario: Scenario, **kwargs: Any) -> PipelineKit:
    return serve_pipeline(make_pipeline(tmp_path, **kwargs), scenario)


async def register(client: httpx.AsyncClient, kit: PipelineKit, body: bytes = b"fn") -> str:
    r = await client.post(
        "/v1/functions", json={"function": b64(body), "name": "f"}, headers=kit.headers(ALICE)
    )
    assert r.status_code == 200, r.text
    return str(r.json()["function_id"])


def submit_body(
    fid: str, payloads: list[bytes], variables: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "user_endpoint_config": variables or {"workers": 2},
        "tasks": [{"function_id": fid, "args": b64(p)} for p in payloads],
    }


def assert_error(r: httpx.Response, status: int, reason: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["reason"] == reason
    assert error["message"] == REASONS[reason]
    assert set(error) <= {"reason", "message", "violations"}
    return dict(error)


def test_register_submit_wait_roundtrip(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        fid = await register(client, kit)
        assert fid == hashlib.sha256(b"fn").hexdigest()
        assert await register(client, kit) == fid  # idempotent
        r = await client.post(
            "/v1/endpoints/hpc/submit",
            headers=kit.headers(ALICE),
            json=submit_body(fid, [b"a", b"b", b"fail"]),
        )
        assert r.status_code == 200, r.text
        ids = r.json()["task_ids"]
        assert len(ids) == 3 and len(set(ids)) == 3
        got: dict[str, Any] = {}
        for _ in range(10):
            w = await client.post(
                "/v1/tasks/wait", headers=kit.headers(ALICE), json={"task_ids": ids, "timeout": 5}
            )
            assert w.status_code == 200
            for t in w.json()["tasks"]:
                got[t["task_id"]] = t
            if len(got) == 3:
                break
        assert base64.b64decode(got[ids[0]]["result"]) == b"echo:a"
        assert base64.b64decode(got[ids[1]]["result"]) == b"echo:b"
        assert got[ids[2]]["state"] == "failed"
        assert got[ids[2]]["error"]["type_name"] == "ValueError"
        single = await client.get(f"/v1/tasks/{ids[0]}", headers=kit.headers(ALICE))
        assert single.json()["state"] == "success"

    kit = run(tmp_path, scenario)
    assert len(kit.endpoints.starts) == 1
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    events = [x["event"] for x in lines]
    for needed in (
        "identity.mapping_resolved",
        "authz.decided",
        "task.received",
        "task.started",
        "task.finished",
    ):
        assert needed in events
    assert sum(e == "task.finished" for e in events) == 3
    assert (tmp_path / "audit.jsonl").stat().st_mode & 0o777 == 0o600


def test_wait_is_woken_by_a_result_not_by_its_timeout(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        kit.endpoints.hold = True
        fid = await register(client, kit)
        r = await client.post(
            "/v1/endpoints/hpc/submit", headers=kit.headers(ALICE), json=submit_body(fid, [b"x"])
        )
        (task_id,) = r.json()["task_ids"]
        waiter = asyncio.create_task(
            client.post(
                "/v1/tasks/wait",
                headers=kit.headers(ALICE),
                json={"task_ids": [task_id], "timeout": 50},
            )
        )
        for _ in range(100):  # let the wait register its event
            await asyncio.sleep(0)
        handle = next(iter(kit.endpoints.handles.values()))
        for task in handle.held:
            handle.complete(task)
        w = await asyncio.wait_for(waiter, 10)
        assert [t["task_id"] for t in w.json()["tasks"]] == [task_id]

    run(tmp_path, scenario)


def test_wait_times_out_with_pending(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        kit.endpoints.hold = True
        fid = await register(client, kit)
        r = await client.post(
            "/v1/endpoints/hpc/submit", headers=kit.headers(ALICE), json=submit_body(fid, [b"x"])
        )
        ids = r.json()["task_ids"]
        w = await client.post(
            "/v1/tasks/wait",
            headers=kit.headers(ALICE),
            json={"task_ids": [*ids, "nope"], "timeout": 0.05},
        )
        assert w.json() == {"tasks": [], "pending": ids, "unknown": ["nope"]}

    run(tmp_path, scenario)


def test_unmapped_identity_gets_403_no_mapping(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        fid = await register(client, kit)
        r = await client.post(
            "/v1/endpoints/hpc/submit",
            headers=kit.headers("eve@evil.org"),
            json=submit_body(fid, [b"x"]),
        )
        assert_error(r, 403, "identity.no_mapping")

    kit = run(tmp_path, scenario)
    assert not kit.endpoints.starts
    assert "identity.mapping_failed" in (tmp_path / "audit.jsonl").read_text()


# caller's identity -> (the account name it maps to, the specific refusal code)
ACCOUNT_REFUSALS = {
    "carol@example.org": ("carol", "identity.account_missing"),
    "svc@example.org": ("svc", "identity.account_uid_too_low"),
    "nobody@example.org": ("nobody", "identity.account_denied"),
    "root@example.org": ("root", "identity.account_root"),
    "mepd@example.org": ("mepd", "identity.account_daemon"),
    "dave@example.org": ("Dave", "identity.account_name_mismatch"),
    "zero@example.org": ("4294967295", "identity.invalid_username"),
    "erin@example.org": ("erin", "identity.account_locked"),
    "fred@example.org": ("fred", "identity.account_expired"),
    "gina@example.org": ("gina", "identity.account_nologin"),
}


def test_every_account_refusal_looks_the_same_to_the_caller(tmp_path: Path) -> None:
    from mepcore.identity import AccountPolicy
    from mepcore.types import ShadowEntry
    from tests.daemon_harness import FAKE_TODAY

    bodies: dict[str, Any] = {}

    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        site = kit.site
        site.account_policy = AccountPolicy(daemon_uid=2500, deny=["nobody"])
        site.mapping.update({caller: name for caller, (name, _) in ACCOUNT_REFUSALS.items()})
        for name, uid in [("svc", 999), ("nobody", 65534), ("root", 0), ("mepd", 2500)]:
            site.accounts.add(name, uid)
        site.accounts.add("Dave", 2003, pw_name="dave")  # the database answers by alias
        site.accounts.add("4294967295", 2004)
        site.accounts.add("erin", 2005)
        site.shadow.entries["erin"] = ShadowEntry("erin", locked=True)
        site.accounts.add("fred", 2006)
        site.shadow.entries["fred"] = ShadowEntry("fred", locked=False, expires=FAKE_TODAY - 1)
        site.accounts.add("gina", 2007, shell="/usr/sbin/nologin")
        fid = await register(client, kit)
        for caller in ACCOUNT_REFUSALS:
            r = await client.post(
                "/v1/endpoints/hpc/submit",
                headers=kit.headers(caller),
                json=submit_body(fid, [b"x"]),
            )
            assert_error(r, 403, "identity.account_refused")
            bodies[caller] = r.json()

    kit = run(tmp_path, scenario)
    assert not kit.endpoints.starts
    # One answer, whatever the reason: nothing tells a caller which accounts exist.
    assert len({json.dumps(b, sort_keys=True) for b in bodies.values()}) == 1
    # The audit log has the specific code (and what the caller was told) for each.
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    failures = [x for x in lines if x["event"] == "identity.mapping_failed"]
    assert [(x["reason"], x["public_reason"]) for x in failures] == [
        (code, "identity.account_refused") for _, code in ACCOUNT_REFUSALS.values()
    ]
    for failure, (name, _) in zip(failures, ACCOUNT_REFUSALS.values(), strict=True):
        assert repr(name) in failure["detail"]


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "auth.missing_token"),
        ("Basic abc", "auth.missing_token"),
        ("Bearer not-a-token", "auth.invalid_token"),
    ],
)
def test_bad_tokens_get_401(tmp_path: Path, header: str | None, reason: str) -> None:
    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        headers = {"Authorization": header} if header else {}
        r = await client.post("/v1/functions", json={"function": b64(b"x")}, headers=headers)
        assert_error(r, 401, reason)
        assert r.headers["www-authenticate"].startswith("Bearer")

    run(tmp_path, scenario)
    assert "auth.failed" in (tmp_path / "audit.jsonl").read_text()


def test_policy_denied_function_gets_403_and_starts_nothing(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        fid = await register(client, kit)
        kit.site.denied.add((f"function:{fid}", "submit_task"))
        r = await client.post(
            "/v1/endpoints/hpc/submit", headers=kit.headers(ALICE), json=submit_body(fid, [b"x"])
        )
        assert_error(r, 403, "authz.denied")

    kit = run(tmp_path, scenario)
    assert not kit.endpoints.starts
    denied = [
        json.loads(x)
        for x in (tmp_path / "audit.jsonl").read_text().splitlines()
        if '"allowed":false' in x
    ]
    assert denied and denied[0]["lines"] == ["p, deny line"]


def test_pipeline_asks_the_policy_for_each_step(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        f1 = await register(client, kit, b"one")
        f2 = await register(client, kit, b"two")
        body = submit_body(f1, [b"x"])
        body["tasks"].append({"function_id": f2, "args": b64(b"y")})
        body["tasks"].append({"function_id": f1, "args": b64(b"z")})
        r = await client.post("/v1/endpoints/hpc/submit", headers=kit.headers(ALICE), json=body)
        assert r.status_code == 200
        asked = [(o, a) for o, a, _ in kit.site.decisions]
        assert asked == [
            ("user:alice", "map_identity"),
            ("template:default", "start_endpoint"),
            (f"function:{f1}", "submit_task"),
            (f"function:{f2}", "submit_task"),
        ]
        principals = kit.site.decisions[0][2]
        assert "username:alice@example.org" in principals
        assert "domain:example.org" in principals
        assert "user:alice" in principals

    run(tmp_path, scenario)


def test_allow_list_refuses_other_functions(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        fid = await register(client, kit)
        kit.site.allowed_functions = frozenset({"0" * 64})
        r = await client.post(
            "/v1/endpoints/hpc/submit", headers=kit.headers(ALICE), json=submit_body(fid, [b"x"])
        )
        assert_error(r, 403, "task.function_not_allowed")

    run(tmp_path, scenario)


def test_unknown_function_is_422(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        r = await client.post(
            "/v1/endpoints/hpc/submit",
            headers=kit.headers(ALICE),
            json=submit_body("a" * 64, [b"x"]),
        )
        assert_error(r, 422, "task.function_unknown")

    run(tmp_path, scenario)


def test_invalid_variables_get_422_listing_every_violation(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        fid = await register(client, kit)
        r = await client.post(
            "/v1/endpoints/hpc/submit",
            headers=kit.headers(ALICE),
            json=submit_body(fid, [b"x"], {"workers": 99, "queue": "forever", "x": 1}),
        )
        error = assert_error(r, 422, "config.invalid_variables")
        assert len(error["violations"]) == 3
        paths = {v["path"] for v in error["violations"]}
        assert {"$.workers", "$.queue"} <= paths

    kit = run(tmp_path, scenario)
    assert not kit.endpoints.starts


def test_malformed_submit_lists_violations(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        r = await client.post(
            "/v1/endpoints/hpc/submit",
            headers=kit.headers(ALICE),
            json={"tasks": [{"function_id": "zz", "args": 3}], "extra": 1},
        )
        error = assert_error(r, 400, "api.bad_request")
        assert len(error["violations"]) == 3
        r = await client.post(
            "/v1/endpoints/hpc/submit", headers=kit.headers(ALICE), content=b"{not json"
        )
        assert_error(r, 400, "api.bad_request")

    run(tmp_path, scenario)


def test_unknown_endpoint_is_404(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        fid = await register(client, kit)
        r = await client.post(
            "/v1/endpoints/nope/submit", headers=kit.headers(ALICE), json=submit_body(fid, [b"x"])
        )
        assert_error(r, 404, "api.endpoint_unknown")
        r = await client.get("/v1/nothing-here")
        assert_error(r, 404, "api.not_found")

    run(tmp_path, scenario)


def test_body_over_limit_is_413_from_content_length(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        r = await client.post("/v1/functions", headers=kit.headers(ALICE), content=b"x" * 5000)
        assert_error(r, 413, "api.body_too_large")

    run(tmp_path, scenario, limits=Limits(max_body_bytes=4096))


def test_streamed_body_over_limit_is_413_without_reading_it_all(tmp_path: Path) -> None:
    sent = []

    async def endless() -> AsyncIterator[bytes]:
        for _ in range(10_000):  # bounded: 10 MB if the server read it all
            sent.append(1)
            yield b"x" * 1024

    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        r = await client.post("/v1/functions", headers=kit.headers(ALICE), content=endless())
        assert_error(r, 413, "api.body_too_large")

    run(tmp_path, scenario, limits=Limits(max_body_bytes=4096))
    assert len(sent) < 100


def test_json_depth_is_bounded(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        deep = "[" * 100 + "]" * 100
        r = await client.post("/v1/functions", headers=kit.headers(ALICE), content=deep.encode())
        assert_error(r, 400, "api.bad_request")
        deeper = "[" * 100_000 + "]" * 100_000
        r = await client.post("/v1/functions", headers=kit.headers(ALICE), content=deeper.encode())
        assert_error(r, 400, "api.bad_request")

    run(tmp_path, scenario)
    assert json_depth_ok({"a": [1, {"b": []}]}, 4)
    assert not json_depth_ok({"a": [1, {"b": []}]}, 3)


def test_oversized_payload_is_413(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        fid = await register(client, kit)
        r = await client.post(
            "/v1/endpoints/hpc/submit",
            headers=kit.headers(ALICE),
            json=submit_body(fid, [b"x" * 200]),
        )
        assert_error(r, 413, "task.payload_too_large")

    run(tmp_path, scenario, limits=Limits(max_payload_bytes=100))


def test_other_callers_tasks_are_404_not_403(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        fid = await register(client, kit)
        r = await client.post(
            "/v1/endpoints/hpc/submit", headers=kit.headers(ALICE), json=submit_body(fid, [b"x"])
        )
        (task_id,) = r.json()["task_ids"]
        assert_error(
            await client.get(f"/v1/tasks/{task_id}", headers=kit.headers(BOB)),
            404,
            "task.not_found",
        )
        assert_error(
            await client.delete(f"/v1/tasks/{task_id}", headers=kit.headers(BOB)),
            404,
            "task.not_found",
        )
        assert_error(
            await client.get("/v1/tasks/no-such", headers=kit.headers(ALICE)), 404, "task.not_found"
        )
        w = await client.post(
            "/v1/tasks/wait", headers=kit.headers(BOB), json={"task_ids": [task_id], "timeout": 0}
        )
        assert w.json()["unknown"] == [task_id]

    run(tmp_path, scenario)


def test_cancel_of_a_dispatched_task_tells_its_endpoint_and_ends_it_cancelled(
    tmp_path: Path,
) -> None:
    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        kit.endpoints.hold = True
        fid = await register(client, kit)
        r = await client.post(
            "/v1/endpoints/hpc/submit", headers=kit.headers(ALICE), json=submit_body(fid, [b"x"])
        )
        (task_id,) = r.json()["task_ids"]
        r = await client.delete(f"/v1/tasks/{task_id}", headers=kit.headers(ALICE))
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "cancelled"
        assert r.json()["error"]["reason"] == "task.cancelled"
        assert kit.endpoints.cancelled == [task_id]
        assert kit.pipeline.in_flight.get(task_id) is None
        # The endpoint's late answer changes nothing; a second cancel neither.
        (handle,) = kit.endpoints.handles.values()
        handle.complete(handle.held[0])
        r = await client.delete(f"/v1/tasks/{task_id}", headers=kit.headers(ALICE))
        assert r.json()["state"] == "cancelled"
        assert kit.endpoints.cancelled == [task_id]

    run(tmp_path, scenario)


def test_audit_failure_refuses_new_work_with_503(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        r = await client.post(
            "/v1/functions", headers=kit.headers(ALICE), json={"function": b64(b"x")}
        )
        assert_error(r, 503, "audit.unavailable")
        r = await client.post(
            "/v1/endpoints/hpc/submit",
            headers=kit.headers(ALICE),
            json=submit_body("a" * 64, [b"x"]),
        )
        assert_error(r, 503, "audit.unavailable")
        assert (await client.get("/healthz")).status_code == 503

    kit = run(tmp_path, scenario, audit=BrokenAudit())
    assert not kit.endpoints.starts


def test_audit_write_failure_midway_is_503(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        fid = await register(client, kit)
        audit = kit.pipeline.audit
        # The disk fills up: the file descriptor now points to /dev/full.
        full = __import__("os").open("/dev/full", __import__("os").O_WRONLY)
        __import__("os").dup2(full, audit._fd)  # type: ignore[attr-defined]
        r = await client.post(
            "/v1/endpoints/hpc/submit", headers=kit.headers(ALICE), json=submit_body(fid, [b"x"])
        )
        assert_error(r, 503, "audit.unavailable")
        assert kit.pipeline.store.counts_by_state() == {}
        r = await client.post(
            "/v1/endpoints/hpc/submit", headers=kit.headers(ALICE), json=submit_body(fid, [b"x"])
        )
        assert_error(r, 503, "audit.unavailable")

    run(tmp_path, scenario)


def test_queued_task_limit_is_429_with_retry_after(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        kit.endpoints.hold = True
        fid = await register(client, kit)
        r = await client.post(
            "/v1/endpoints/hpc/submit",
            headers=kit.headers(ALICE),
            json=submit_body(fid, [b"x", b"y"]),
        )
        assert r.status_code == 200
        r = await client.post(
            "/v1/endpoints/hpc/submit", headers=kit.headers(ALICE), json=submit_body(fid, [b"z"])
        )
        assert_error(r, 429, "api.too_many_requests")
        assert int(r.headers["retry-after"]) > 0
        r = await client.post(
            "/v1/endpoints/hpc/submit", headers=kit.headers(BOB), json=submit_body(fid, [b"z"])
        )
        assert r.status_code == 200  # the limit is per user

    run(tmp_path, scenario, limits=Limits(queued_tasks_per_user=2))


def test_draining_refuses_new_work(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        fid = await register(client, kit)
        assert await kit.pipeline.drain(1.0) == 0
        r = await client.post(
            "/v1/endpoints/hpc/submit", headers=kit.headers(ALICE), json=submit_body(fid, [b"x"])
        )
        assert_error(r, 503, "api.shutting_down")
        assert (await client.get("/healthz")).json()["status"] == "draining"

    run(tmp_path, scenario)


def test_drain_waits_for_in_flight_tasks_up_to_a_bound(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        kit.endpoints.hold = True
        fid = await register(client, kit)
        await client.post(
            "/v1/endpoints/hpc/submit", headers=kit.headers(ALICE), json=submit_body(fid, [b"x"])
        )
        assert await kit.pipeline.drain(0.05) == 1  # bounded: gives up
        handle = next(iter(kit.endpoints.handles.values()))
        drained = asyncio.create_task(kit.pipeline.drain(30))
        await asyncio.sleep(0)
        for task in handle.held:
            handle.complete(task)
        assert await asyncio.wait_for(drained, 10) == 0

    run(tmp_path, scenario)


def test_status_and_stop(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        fid = await register(client, kit)
        await client.post(
            "/v1/endpoints/hpc/submit", headers=kit.headers(ALICE), json=submit_body(fid, [b"x"])
        )
        await client.post(
            "/v1/endpoints/hpc/submit", headers=kit.headers(BOB), json=submit_body(fid, [b"x"])
        )
        s = await client.get("/v1/endpoints/hpc/status", headers=kit.headers(ALICE))
        assert len(s.json()["user_endpoints"]) == 1
        r = await client.post(
            "/v1/endpoints/hpc/stop", headers=kit.headers(ALICE), json={"account": "bob"}
        )
        assert_error(r, 403, "authz.denied")
        r = await client.post("/v1/endpoints/hpc/stop", headers=kit.headers(ALICE))
        assert r.json() == {"stopped": 1}
        kit.site.admins.add("alice")
        r = await client.post(
            "/v1/endpoints/hpc/stop", headers=kit.headers(ALICE), json={"account": "bob"}
        )
        assert r.json() == {"stopped": 1}

    run(tmp_path, scenario)


def test_metrics_count_requests_decisions_and_tasks(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        fid = await register(client, kit)
        r = await client.post(
            "/v1/endpoints/hpc/submit", headers=kit.headers(ALICE), json=submit_body(fid, [b"x"])
        )
        await client.post(
            "/v1/tasks/wait",
            headers=kit.headers(ALICE),
            json={"task_ids": r.json()["task_ids"], "timeout": 5},
        )
        text = (await client.get("/metrics")).text
        assert 'mepd_http_requests_total{route="submit",status="200"} 1' in text
        assert 'mepd_authz_decisions_total{action="submit_task",allowed="true"} 1' in text
        assert 'mepd_tasks_total{state="success"} 1' in text
        # prometheus_client writes a sample's labels sorted by name (le before route)
        assert 'mepd_http_request_seconds_bucket{le="+Inf",route="functions"} 1' in text

    run(tmp_path, scenario)


def test_openapi_is_served_and_the_committed_copy_is_current(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        doc = (await client.get("/v1/openapi.json")).json()
        assert doc["openapi"].startswith("3.1")
        assert "/v1/endpoints/{endpoint}/submit" in doc["paths"]

    run(tmp_path, scenario)
    committed = (REPO / "docs" / "openapi.json").read_text()
    assert committed == openapi_text(), (
        "docs/openapi.json is stale: run `.venv/bin/python -m mepd.api > docs/openapi.json`"
    )


FID = "a" * 64


@pytest.mark.parametrize(
    "body",
    [
        {"tasks": [{"function_id": FID, "args": "eA=="}]},
        {
            "tasks": [{"function_id": FID, "args": "", "walltime": 2.5}],
            "user_endpoint_config": {"a": 1},
            "user_runtime": {},
        },
        {"tasks": [{"function_id": FID, "args": "", "walltime": 1}]},
        {"tasks": []},
        {"tasks": [{"function_id": FID}]},
        {"tasks": [{"function_id": FID.upper(), "args": ""}]},
        {"tasks": [{"function_id": FID, "args": "", "walltime": 0}]},
        {"tasks": [{"function_id": FID, "args": "", "walltime": True}]},
        {"tasks": [{"function_id": FID, "args": 1}]},
        {"tasks": [{"function_id": FID, "args": "", "x": 1}]},
        {"tasks": [{"function_id": FID, "args": ""}], "user_endpoint_config": []},
        {"tasks": [{"function_id": FID, "args": ""}], "other": 1},
        {"tasks": "no"},
        [],
        None,
    ],
)
def test_fast_submit_check_agrees_with_the_schema(body: Any) -> None:
    import jsonschema

    from mepd.shapes import SUBMIT_SCHEMA, submit_shape_ok

    schema_ok = not list(jsonschema.Draft202012Validator(SUBMIT_SCHEMA).iter_errors(body))
    assert submit_shape_ok(body) == schema_ok


@pytest.mark.parametrize(
    "body",
    [
        {"task_ids": ["a", "b"], "timeout": 1},
        {"task_ids": []},
        {"task_ids": [1]},
        {"task_ids": ["a"], "timeout": -1},
        {"task_ids": ["a"], "timeout": False},
        {"task_ids": ["a"], "x": 1},
        {"timeout": 1},
        "x",
    ],
)
def test_fast_wait_check_agrees_with_the_schema(body: Any) -> None:
    import jsonschema

    from mepd.shapes import WAIT_SCHEMA, wait_shape_ok

    schema_ok = not list(jsonschema.Draft202012Validator(WAIT_SCHEMA).iter_errors(body))
    assert wait_shape_ok(body) == schema_ok


def test_queued_tasks_are_dispatched_after_a_restart_and_can_be_cancelled(
    tmp_path: Path,
) -> None:
    from mepcore.types import Identity
    from mepd.spec import EndpointSpec
    from mepd.store import NewTask

    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        fid = await register(client, kit)
        store = kit.pipeline.store
        owner = (
            await kit.pipeline.authenticate(kit.headers(ALICE)["Authorization"], route="test")
        ).owner
        spec = EndpointSpec("hpc", "alice", {"workers": 1}, {}, Identity("x", {"id": "x"}))
        store.put_spec(spec, 1.0)
        store.add_tasks(
            [
                NewTask(f"q{i}", owner, "hpc", "alice", spec.spec_id, fid, f"p{i}".encode(), None)
                for i in range(3)
            ],
            state="queued",
            now=1.0,
        )
        recovery = store.recover(2.0)
        assert len(recovery.queued) == 3
        kit.pipeline.hold_queued(recovery.queued)
        assert kit.pipeline.in_flight.count_account("alice") == 3
        cancelled = await client.delete("/v1/tasks/q1", headers=kit.headers(ALICE))
        assert cancelled.json()["state"] == "cancelled"
        assert cancelled.json()["error"]["reason"] == "task.cancelled"
        await kit.pipeline.redispatch(recovery.queued)
        views: dict[str, Any] = {}
        for _ in range(10):
            pending = [t for t in ("q0", "q2") if t not in views]
            if not pending:
                break
            w = await client.post(
                "/v1/tasks/wait",
                headers=kit.headers(ALICE),
                json={"task_ids": pending, "timeout": 5},
            )
            views.update({t["task_id"]: t for t in w.json()["tasks"]})
        views["q1"] = (await client.get("/v1/tasks/q1", headers=kit.headers(ALICE))).json()
        assert base64.b64decode(views["q0"]["result"]) == b"echo:p0"
        assert base64.b64decode(views["q2"]["result"]) == b"echo:p2"
        assert views["q1"]["state"] == "cancelled"
        assert kit.endpoints.starts[0].spec.variables == {"workers": 1}

    run(tmp_path, scenario)


def test_redispatch_of_an_unusable_spec_fails_the_tasks_with_a_reason(tmp_path: Path) -> None:
    from mepd.spec import EndpointSpec
    from mepd.store import NewTask

    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        fid = await register(client, kit)
        store = kit.pipeline.store
        owner = (
            await kit.pipeline.authenticate(kit.headers(ALICE)["Authorization"], route="test")
        ).owner
        # The account vanished while the daemon was down.
        spec = EndpointSpec("hpc", "carol")
        store.put_spec(spec, 1.0)
        store.add_tasks(
            [NewTask("r0", owner, "hpc", "carol", spec.spec_id, fid, b"x", None)],
            state="queued",
            now=1.0,
        )
        queued = store.recover(2.0).queued
        kit.pipeline.hold_queued(queued)
        await kit.pipeline.redispatch(queued)
        assert len(kit.pipeline.in_flight) == 0
        view = (await client.get("/v1/tasks/r0", headers=kit.headers(ALICE))).json()
        assert view["state"] == "failed"
        assert view["error"]["reason"] == "identity.account_refused"

    run(tmp_path, scenario)


def test_a_blocking_mapping_runs_off_the_event_loop(tmp_path: Path) -> None:
    import threading

    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        fid = await register(client, kit)
        body = submit_body(fid, [b"x"])
        r = await client.post("/v1/endpoints/hpc/submit", headers=kit.headers(ALICE), json=body)
        assert r.status_code == 200
        kit.site.mapping_blocks = True
        r = await client.post("/v1/endpoints/hpc/submit", headers=kit.headers(ALICE), json=body)
        assert r.status_code == 200
        main = threading.main_thread().name
        assert kit.site.map_threads[0] == main
        assert kit.site.map_threads[1] != main

    run(tmp_path, scenario)
