"""Strict input, request ids, fixed public messages and per-identity rate limits, through
the real Starlette app in process (real tokens, store and audit log; fake site and user
endpoints from tests/daemon_harness.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from mepcore.errors import REASONS, ConfigError, Violation
from mepd.api import error_response
from mepd.audit import AuditLog
from mepd.handle import error_from_frame
from mepd.ratelimit import Gate, RateLimiter
from mepd.settings import EdgeSettings
from mepd.uep.server import error_fields
from tests.daemon_harness import PipelineKit, Scenario, b64, make_pipeline, serve_pipeline

ALICE = "alice@example.org"
BOB = "bob@example.org"


def run(tmp_path: Path, scenario: Scenario, edge: EdgeSettings | None = None) -> PipelineKit:
    return serve_pipeline(make_pipeline(tmp_path), scenario, edge)


def refused(r: httpx.Response, status: int, reason: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert error["reason"] == reason
    assert error["message"] == REASONS[reason]
    assert r.headers["x-request-id"]
    return dict(error)


JSON = {"Content-Type": "application/json"}


def test_duplicate_keys_bom_and_non_json_are_refused(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        h = kit.headers(ALICE)
        fn = b64(b"fn")
        dup = f'{{"function": "{fn}", "function": "{fn}"}}'.encode()
        r = await client.post("/v1/functions", content=dup, headers={**h, **JSON})
        refused(r, 400, "api.bad_request")
        nested = f'{{"function": "{fn}", "name": "f", "source": "x", "name": "g"}}'.encode()
        r = await client.post("/v1/functions", content=nested, headers={**h, **JSON})
        refused(r, 400, "api.bad_request")
        good = json.dumps({"function": fn}).encode()
        r = await client.post("/v1/functions", content=b"\xef\xbb\xbf" + good, headers=h | JSON)
        refused(r, 400, "api.bad_request")
        r = await client.post(
            "/v1/functions", content=good.decode().encode("utf-16"), headers=h | JSON
        )
        refused(r, 400, "api.bad_request")
        r = await client.post(
            "/v1/tasks/wait", content=b'{"task_ids": [], "timeout": NaN}', headers=h | JSON
        )
        refused(r, 400, "api.bad_request")
        for kind in (
            "text/plain",
            "application/x-www-form-urlencoded",
            "application/json; charset=latin-1",
        ):
            r = await client.post(
                "/v1/functions", content=good, headers={**h, "Content-Type": kind}
            )
            refused(r, 415, "api.unsupported_media_type")
        r = await client.post("/v1/functions", data={"function": fn}, headers=h)
        refused(r, 415, "api.unsupported_media_type")
        # The same body, properly typed, is accepted.
        r = await client.post("/v1/functions", content=good, headers=h | JSON)
        assert r.status_code == 200, r.text

    run(tmp_path, scenario)


@pytest.mark.parametrize("body", [b"false", b"[]", b"0", b'"x"', b"null", b'{"account": 3}'])
def test_a_stop_body_that_is_not_the_schema_is_400(tmp_path: Path, body: bytes) -> None:
    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        r = await client.post(
            "/v1/endpoints/hpc/stop", content=body, headers=kit.headers(ALICE) | JSON
        )
        error = refused(r, 400, "api.bad_request")
        assert error["violations"]
        # No body at all is still "stop mine".
        r = await client.post("/v1/endpoints/hpc/stop", headers=kit.headers(ALICE))
        assert r.status_code == 200, r.text

    run(tmp_path, scenario)


def test_405_says_which_methods_are_allowed(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        r = await client.put("/v1/tasks/abc", headers=kit.headers(ALICE))
        refused(r, 405, "api.method_not_allowed")
        assert set(r.headers["allow"].split(", ")) == {"GET", "HEAD", "DELETE"}
        r = await client.get("/v1/functions")
        refused(r, 405, "api.method_not_allowed")
        assert r.headers["allow"] == "POST"
        r = await client.get("/nowhere")
        refused(r, 404, "api.not_found")

    run(tmp_path, scenario)


def test_every_answer_has_a_request_id_echoed_only_when_plain(tmp_path: Path) -> None:
    seen: dict[str, str] = {}

    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        for given, kept in [
            ("client-id.1:a_b", True),
            ("x" * 128, True),
            ("x" * 129, False),
            ("two words", False),
            ("new\nline", False),
            ("é", False),
        ]:
            try:
                r = await client.post(
                    "/v1/functions",
                    json={"function": b64(b"fn")},
                    headers={**kit.headers(ALICE), "X-Request-ID": given},
                )
            except (httpx.LocalProtocolError, UnicodeEncodeError):
                continue  # the client itself would not send it
            answered = r.headers["x-request-id"]
            assert (answered == given) is kept, (given, answered)
            if not kept:
                assert len(answered) == 32 and int(answered, 16) >= 0
            seen[given] = answered
        for r in (
            await client.get("/nowhere"),
            await client.delete("/v1/functions"),
            await client.get("/healthz"),
            await client.get("/v1/tasks/abc"),  # 401
        ):
            assert len(r.headers["x-request-id"]) == 32, r

    kit = run(tmp_path, scenario)
    # The id is in the audit record of the request.
    records = [json.loads(x) for x in (kit.state_dir / "audit.jsonl").read_text().splitlines()]
    registered = [r for r in records if r["event"] == "function.registered"]
    assert registered and registered[0]["request_id"] == "client-id.1:a_b"


def test_a_flooding_identity_gets_429_while_another_is_served(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        alice, bob = kit.headers(ALICE), kit.headers(BOB)
        codes = [(await client.get("/v1/tasks/none", headers=alice)).status_code for _ in range(30)]
        assert codes[:5] == [404] * 5  # the burst
        assert 429 in codes[5:]
        r = await client.get("/v1/tasks/none", headers=alice)
        refused(r, 429, "api.rate_limited")
        assert int(r.headers["retry-after"]) >= 1
        # Bob has a bucket of his own.
        r = await client.get("/v1/tasks/none", headers=bob)
        refused(r, 404, "task.not_found")
        # Unauthenticated and service routes are not counted against anyone.
        assert (await client.get("/healthz")).status_code == 200

    run(tmp_path, scenario, EdgeSettings(rate=0.5, burst=5))


def test_token_bucket_refills_at_its_rate() -> None:
    now = [100.0]
    limiter = RateLimiter(rate=2.0, burst=3, max_keys=2, clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.5)
    now[0] += 0.5
    assert limiter.take("a") == 0.0
    assert limiter.take("a") > 0.0
    assert RateLimiter.retry_after(0.01) == 1 and RateLimiter.retry_after(2.2) == 3
    limiter.take("b")
    limiter.take("c")  # over max_keys: "a", the least recent, is forgotten
    assert "a" not in limiter._buckets and len(limiter._buckets) == 2


def test_the_gate_refuses_only_known_tokens_of_empty_buckets_and_takes_nothing() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=1.0, burst=2, clock=lambda: now[0])
    gate = Gate(limiter, max_tokens=2)
    assert gate.refusal(b"Bearer t1") is None  # never verified: the handlers decide
    gate.remember("Bearer t1", "iss|alice")
    assert gate.refusal(b"Bearer t1") is None  # alice has requests left
    assert [gate.refusal(b"Bearer t1") for _ in range(5)] == [None] * 5  # peeking is free
    limiter.take("iss|alice")
    limiter.take("iss|alice")
    refusal = gate.refusal(b"Bearer t1")
    assert refusal is not None and refusal[0] == "iss|alice" and refusal[1] == pytest.approx(1.0)
    assert gate.refusal(b"Bearer t2") is None
    now[0] += 1.0  # a token's worth of time: the gate lets the request through again
    assert gate.refusal(b"Bearer t1") is None
    gate.remember("Bearer t2", "iss|bob")
    gate.remember("Bearer t3", "iss|carol")  # bounded: t1, the oldest, is forgotten
    assert len(gate._owners) == 2


def test_public_messages_come_from_the_table_not_from_the_exception() -> None:
    # What a user endpoint reports when the admin's template uses an undefined name.
    raised = ConfigError(
        "config.undefined_variable",
        "template.j2:7: 'lipsum' is undefined",
        public_message="'lipsum' is undefined (template.j2:7)",
        violations=[Violation("template.j2:7", "'lipsum' is undefined", "undefined")],
    )
    error = error_from_frame(error_fields(raised))
    response = error_response(error)
    text = bytes(response.body).decode()
    assert "lipsum" not in text and "template.j2" not in text, text
    assert json.loads(text) == {
        "error": {
            "reason": "config.undefined_variable",
            "message": REASONS["config.undefined_variable"],
        }
    }
    # A caller's own variables still get their violations.
    mine = ConfigError("config.invalid_variables", violations=[Violation("$.workers", "too big")])
    assert json.loads(bytes(error_response(mine).body))["error"]["violations"] == [
        {"path": "$.workers", "message": "too big", "code": "invalid"}
    ]


def test_audit_fields_are_capped_with_a_marker(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    audit.open()
    audit.record(
        "auth.failed", identity="a\nb\x1b" + "x" * 6000, lines=[str(i) for i in range(500)]
    )
    audit.close()
    (line,) = (tmp_path / "audit.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert len(record["identity"]) < 1100
    assert record["identity"].startswith("a\nb\x1b")
    assert record["identity"].endswith("...[4980 more characters cut]")
    assert len(record["lines"]) == 101 and record["lines"][-1] == "...[400 more items cut]"


_FILLER = """
import json, resource, sys
from pathlib import Path
from mepd.audit import AuditLog, AuditUnavailable

path = Path(sys.argv[1])
audit = AuditLog(path)
audit.open()
# A real file-size limit (RLIMIT_FSIZE; Python ignores SIGXFSZ, so write() fails with
# EFBIG): the records below cannot all fit, and one is cut off part-way by the kernel.
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.RLIM_INFINITY))
failures = 0
for i in range(200):
    try:
        audit.record_many(
            [("task.received", {"task_id": f"t{i}-{j}", "detail": "x" * 300}) for j in range(3)]
        )
    except AuditUnavailable:
        failures += 1
# The limit goes (the operator freed the disk): the next record starts a line of its own.
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
audit.record("daemon.reloaded", problems=[])
print(json.dumps({"failures": failures}))
"""


def test_a_failed_audit_write_leaves_whole_records_only(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "audit.jsonl"
    done = subprocess.run(
        [sys.executable, "-c", _FILLER, str(path), "10000"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(done.stdout)["failures"] > 0
    data = path.read_bytes()
    assert data.endswith(b"\n")
    records = [json.loads(line) for line in data.splitlines()]  # every line is whole JSON
    assert records[-1]["event"] == "daemon.reloaded"
    received = [r for r in records if r["event"] == "task.received"]
    assert 0 < len(received) < 600
    assert all(r["detail"] == "x" * 300 for r in received)
    # A batch is all or nothing: the batches of three that failed left no record.
    assert len(received) % 3 == 0
