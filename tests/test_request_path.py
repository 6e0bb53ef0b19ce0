"""The cheaper request path keeps its promises: audit lines written without the JSON
encoder are the encoder's bytes, a submit's decisions reach the audit log (in one write)
before anything they allow, the cached timestamp prefix and metric label children give
the same figures, and the remembered function ids still refuse an unknown function.

Real: AuditLog on a file, Starlette app, local-issuer tokens, SQLite store, Prometheus
registry. Fake: mapping, policy and user endpoints (tests/daemon_harness.py).
"""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest

from mepcore.errors import MepError
from mepd.audit import MAX_FIELD_CHARS, MAX_LIST_ITEMS, AuditLog, AuditUnavailable, capped
from mepd.logs import request_scope, rfc3339
from mepd.metrics import Metrics
from tests.daemon_harness import PipelineKit, b64, make_pipeline, serve_pipeline

ALICE = "alice@example.org"

_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str)

RECORDS: list[tuple[str, dict[str, Any]]] = [
    ("task.received", {"task_id": "0f2c", "account": "alice", "config_key": "k" * 64}),
    ("authz.decided", {"allowed": True, "lines": ['policy.csv:3 p, "user:alice", é ✓']}),
    ("authz.decided", {"allowed": False, "reason": None, "uid": 1001, "lines": []}),
    ("identity.mapping_failed", {"identities": ["a@b", "tab\there", "nl\n", "\u2028\x00"]}),
    ("x.long", {"detail": "y" * (MAX_FIELD_CHARS + 5), "ok": "z" * MAX_FIELD_CHARS}),
    ("x.many", {"ids": [str(i) for i in range(MAX_LIST_ITEMS + 3)]}),
    ("x.mixed", {"n": 1.5, "nested": {"k": ["v"]}, "t": ("a", "b"), "s": {"only"}}),
    ("x.key", {"k" * 200: "v", 'q"uote': "v"}),
    ("x.types", {"ints": [1, 2], "flag": True, "big": 10**30, "neg": -3}),
]


def _expected(line: str, event: str, fields: Mapping[str, Any]) -> str:
    whole = {"ts": json.loads(line)["ts"], "event": event, **capped(dict(fields))}
    return _ENCODER.encode(whole)


@pytest.mark.parametrize("request_id", [None, "req-7"])
def test_audit_lines_are_the_encoders_bytes(tmp_path: Path, request_id: str | None) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.open()

    def write() -> None:
        for event, fields in RECORDS:
            log.record(event, **fields)
        log.record_many(RECORDS)

    if request_id is None:
        write()
    else:
        with request_scope(request_id):
            write()
    log.close()
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert len(lines) == 2 * len(RECORDS)
    for line, (event, fields) in zip(lines, RECORDS + RECORDS, strict=True):
        given = fields if request_id is None else {"request_id": request_id, **fields}
        assert line == _expected(line, event, given)
        assert json.loads(line)["event"] == event


def test_rfc3339_is_right_across_seconds() -> None:
    start = 1_767_225_599.0  # 2025-12-31T23:59:59Z: the day and the year turn over
    for step in [0.0, 0.25, 0.9999996, 1.0, 1.5, -1.0, 2.000001, 86_400.5, 0.0]:
        epoch = start + step
        want = datetime.datetime.fromtimestamp(round(epoch, 6), datetime.UTC)
        assert rfc3339(epoch) == want.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), step


def test_metric_children_count_like_labels() -> None:
    metrics = Metrics()
    metrics.requests.inc(route="submit", status="200")
    metrics.requests.inc(status="200", route="submit")  # another order, the same child
    metrics.requests.inc(3, route="wait", status="200")
    metrics.latency.observe(0.5, route="submit")
    metrics.latency.observe(1.5, route="submit")
    text = metrics.render()
    assert 'mepd_http_requests_total{route="submit",status="200"} 2.0' in text
    assert 'mepd_http_requests_total{route="wait",status="200"} 3.0' in text
    assert 'mepd_http_request_seconds_count{route="submit"} 2.0' in text
    assert 'mepd_http_request_seconds_sum{route="submit"} 2.0' in text


@attrs.define
class RecordingAudit:
    """An audit sink that keeps each write (a ``record`` or a ``record_many`` call) as
    one list of events, and fails every write once ``fail`` is set."""

    writes: list[list[str]] = attrs.field(factory=list)
    fail: bool = False
    available: bool = True

    def record(self, event: str, **fields: Any) -> None:
        self.record_many([(event, fields)])

    def record_many(self, events: Iterable[tuple[str, Mapping[str, Any]]]) -> None:
        names = [event for event, _ in events]
        if self.fail:
            raise AuditUnavailable(detail="disk full")
        if names:
            self.writes.append(names)


def _run(kit: PipelineKit, scenario: Any) -> None:
    serve_pipeline(kit, lambda client, _kit: scenario(client))


def _submit(fid: str) -> dict[str, Any]:
    return {"user_endpoint_config": {"workers": 2}, "tasks": [{"function_id": fid, "args": "eA=="}]}


async def _register(client: httpx.AsyncClient, kit: PipelineKit) -> str:
    r = await client.post(
        "/v1/functions", headers=kit.headers(ALICE), json={"function": b64(b"fn")}
    )
    return str(r.json()["function_id"])


async def _submit_one(
    client: httpx.AsyncClient, kit: PipelineKit, fid: str, **extra: Any
) -> httpx.Response:
    return await client.post(
        "/v1/endpoints/hpc/submit", headers=kit.headers(ALICE), json=_submit(fid), **extra
    )


def test_a_submits_decisions_are_one_write_before_the_task(tmp_path: Path) -> None:
    audit = RecordingAudit()
    kit = make_pipeline(tmp_path, audit=audit)

    async def scenario(client: httpx.AsyncClient) -> None:
        fid = await _register(client, kit)
        audit.writes.clear()
        r = await _submit_one(client, kit, fid, params={"wait": 5})
        assert r.status_code == 200, r.text
        assert r.json()["tasks"][0]["state"] == "success"

    _run(kit, scenario)
    decisions = ["identity.mapping_resolved", *["authz.decided"] * 3]
    assert audit.writes[0] == decisions
    assert audit.writes[1:3] == [["task.received"], ["task.started"]]
    assert ["task.finished"] in audit.writes[3:]


def test_a_denied_submit_writes_its_decisions_and_starts_nothing(tmp_path: Path) -> None:
    audit = RecordingAudit()
    kit = make_pipeline(tmp_path, audit=audit)
    kit.site.denied.add(("template:default", "start_endpoint"))

    async def scenario(client: httpx.AsyncClient) -> None:
        fid = await _register(client, kit)
        audit.writes.clear()
        r = await _submit_one(client, kit, fid)
        assert r.status_code == 403, r.text
        assert r.json()["error"]["reason"] == "authz.denied"

    _run(kit, scenario)
    # Mapped, allowed to map, refused the template: the third question is never asked.
    assert audit.writes == [["identity.mapping_resolved", "authz.decided", "authz.decided"]]
    assert not kit.endpoints.starts
    assert kit.pipeline.store.counts_by_state() == {}


def test_decisions_the_log_cannot_take_refuse_the_submit(tmp_path: Path) -> None:
    audit = RecordingAudit()
    kit = make_pipeline(tmp_path, audit=audit)

    async def scenario(client: httpx.AsyncClient) -> None:
        fid = await _register(client, kit)
        audit.fail = True
        r = await _submit_one(client, kit, fid)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["reason"] == "audit.unavailable"

    _run(kit, scenario)
    assert not kit.endpoints.starts
    assert kit.pipeline.store.counts_by_state() == {}


def test_remembered_functions_still_refuse_unknown_ones(tmp_path: Path) -> None:
    kit = make_pipeline(tmp_path)

    async def scenario(client: httpx.AsyncClient) -> None:
        fid = await _register(client, kit)
        for _ in range(2):  # asked of the store, then remembered
            r = await _submit_one(client, kit, fid)
            assert r.status_code == 200, r.text
        other = "0" * 64
        r = await client.post(
            "/v1/endpoints/hpc/submit",
            headers=kit.headers(ALICE),
            json={**_submit(fid), "tasks": [{"function_id": other, "args": "eA=="}] * 2},
        )
        assert r.status_code == 422, r.text
        assert r.json()["error"]["reason"] == "task.function_unknown"

    _run(kit, scenario)


def test_admission_remembers_a_spec_only_for_the_same_inputs(tmp_path: Path) -> None:
    kit = make_pipeline(tmp_path)
    admission = kit.pipeline.admission

    async def main() -> None:
        caller = await kit.pipeline.authenticate(kit.headers(ALICE)["Authorization"], route="t")
        first = await admission.admit_submit(kit.site, caller, [], {"workers": 2}, {})
        again = await admission.admit_submit(kit.site, caller, [], {"workers": 2}, {})
        assert again.spec is first.spec and again.config_key == first.config_key
        other = await admission.admit_submit(kit.site, caller, [], {"workers": 3}, {})
        assert other.spec.variables == {"workers": 3}
        assert other.config_key != first.config_key
        runtime = await admission.admit_submit(kit.site, caller, [], {"workers": 2}, {"v": 1})
        assert runtime.spec.spec_id != first.spec.spec_id
        reloaded = attrs.evolve(kit.site)  # a reload makes new site objects
        fresh = await admission.admit_submit(reloaded, caller, [], {"workers": 2}, {})
        assert fresh.spec is not first.spec and fresh.spec == first.spec
        kit.site.accounts.add("alice", 2099)  # the account changed under the same name
        moved = await admission.admit_submit(kit.site, caller, [], {"workers": 2}, {})
        assert moved.account.uid == 2099 and moved.spec is not first.spec
        for _ in range(2):  # invalid variables are refused every time
            with pytest.raises(MepError) as refused:
                await admission.admit_submit(kit.site, caller, [], {"workers": 99}, {})
            assert refused.value.reason == "config.invalid_variables"

    asyncio.run(main())
