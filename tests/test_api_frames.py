"""mep frames (``application/vnd.mep.frames``): payloads and results without base64.

Over the real Starlette app and pipeline (in process, and served by uvicorn on 127.0.0.1
for the client), with the user endpoints faked (``tests/daemon_harness.py``): exact bytes
both ways (empty and largest payloads included), refused frames with their reason and a
precise violation, JSON callers unchanged beside frames callers, the content negotiation
of answers, and the client's fallback to JSON with a daemon that has no frames.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mepcore.client import Client, Executor, TaskRequest
from mepcore.client import frames as client_frames
from mepd import frames
from mepd.api import create_app
from mepd.settings import Limits
from tests.daemon_harness import PipelineKit, Scenario, b64, make_pipeline, serve_pipeline
from tests.test_client_fakes import FakeDaemon, _pipeline, _serve, _stop, fake_daemon

ALICE = "alice@example.org"
FRAMES = {"Content-Type": frames.MEDIA_TYPE}
ACCEPT = {"Accept": frames.MEDIA_TYPE}


def run(tmp_path: Path, scenario: Scenario, **kwargs: Any) -> PipelineKit:
    return serve_pipeline(make_pipeline(tmp_path, **kwargs), scenario)


def body(header: Any, parts: list[bytes]) -> bytes:
    return frames.encode(json.dumps(header).encode(), parts)


def headers(kit: PipelineKit, *more: dict[str, str]) -> dict[str, str]:
    out = dict(kit.headers(ALICE))
    for extra in more:
        out.update(extra)
    return out


async def register(client: httpx.AsyncClient, kit: PipelineKit, fn: bytes = b"fn") -> str:
    r = await client.post(
        "/v1/functions", content=body({"name": "f"}, [fn]), headers=headers(kit, FRAMES)
    )
    assert r.status_code == 200, r.text
    return str(r.json()["function_id"])


async def submit(client: httpx.AsyncClient, kit: PipelineKit, fid: str, args: list[bytes]) -> Any:
    header = {"tasks": [{"function_id": fid} for _ in args]}
    return await client.post(
        "/v1/endpoints/hpc/submit", content=body(header, args), headers=headers(kit, FRAMES)
    )


async def finished(client: httpx.AsyncClient, kit: PipelineKit, ids: list[str]) -> dict[str, Any]:
    """Long-poll (frames answers) until every id is final: id -> (view, result bytes)."""
    got: dict[str, Any] = {}
    while len(got) < len(ids):
        r = await client.post(
            "/v1/tasks/wait",
            json={"task_ids": [i for i in ids if i not in got], "timeout": 10},
            headers=headers(kit, ACCEPT),
        )
        assert r.status_code == 200 and r.headers["content-type"] == frames.MEDIA_TYPE
        header, parts = frames.decode(r.content)
        answer = json.loads(header)
        for view in answer["tasks"]:
            result = parts[view["result_frame"]] if "result_frame" in view else None
            got[view["task_id"]] = (view, result)
    return got


# -- the codec ------------------------------------------------------------------------


def test_the_two_codecs_agree_byte_for_byte() -> None:
    parts = [b"", b"\x00" * 3, bytes(range(256))]
    encoded = client_frames.encode({"a": [1, "x"]}, parts)
    assert encoded == frames.encode(b'{"a":[1,"x"]}', parts)
    assert encoded[:5] == b"MEPF\x01"
    assert frames.decode(encoded) == (b'{"a":[1,"x"]}', parts)
    assert client_frames.decode(encoded) == ({"a": [1, "x"]}, parts)


@pytest.mark.parametrize(
    ("raw", "where"),
    [
        (b"JSON{}", "$frames.magic"),
        (b"MEPF\x02" + bytes(8), "$frames.version"),
        (b"MEPF\x01\x00\x00", "$frames.header_length"),
        (b"MEPF\x01" + struct.pack(">I", 99) + b"{}", "$frames.header"),
        (b"MEPF\x01" + struct.pack(">I", 2) + b"{}", "$frames.count"),
        (
            b"MEPF\x01" + struct.pack(">II", 2, 0)[:4] + b"{}" + struct.pack(">I", 10**6),
            "$frames.count",
        ),
        (frames.encode(b"{}", [b"abc"])[:-1], "$frames[0]"),
        (frames.encode(b"{}", [b"abc"]) + b"!", "$frames.end"),
    ],
)
def test_a_malformed_body_is_named_precisely(raw: bytes, where: str) -> None:
    with pytest.raises(Exception) as caught:
        frames.decode(raw)
    error = caught.value
    assert getattr(error, "reason", None) == "api.bad_request"
    assert [v.path for v in getattr(error, "violations", ())] == [where]


def test_accept_header_negotiation() -> None:
    assert frames.accepts_frames(client_frames.ACCEPT)
    assert frames.accepts_frames(f"application/json, {frames.MEDIA_TYPE};q=0.2")
    assert not frames.accepts_frames(f"{frames.MEDIA_TYPE};q=0")
    assert not frames.accepts_frames("application/json")
    assert not frames.accepts_frames(None)
    assert not frames.accepts_frames("*/*")  # JSON stays the default


# -- the HTTP API ---------------------------------------------------------------------


def test_exact_bytes_both_ways_empty_and_largest(tmp_path: Path) -> None:
    limit = 256 * 1024
    largest = bytes(range(256)) * (limit // 256 - 2)  # echo adds "echo:" to the result
    args = [b"", b"\x00\xff\x00", largest]

    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        fid = await register(client, kit, b"\x00fn\xff")
        assert fid == hashlib.sha256(b"\x00fn\xff").hexdigest()
        r = await submit(client, kit, fid, args)
        assert r.status_code == 200, r.text
        assert r.headers["mep-features"] == "frames"
        ids = r.json()["task_ids"]
        got = await finished(client, kit, ids)
        for task_id, arg in zip(ids, args, strict=True):
            view, result = got[task_id]
            assert view["state"] == "success" and "result" not in view
            assert result == b"echo:" + arg
        # The same task as JSON (no Accept) and as frames (Accept).
        plain = await client.get(f"/v1/tasks/{ids[2]}", headers=headers(kit))
        assert plain.headers["content-type"] == "application/json"
        assert base64.b64decode(plain.json()["result"]) == b"echo:" + largest
        framed = await client.get(f"/v1/tasks/{ids[0]}", headers=headers(kit, ACCEPT))
        header, parts = frames.decode(framed.content)
        assert json.loads(header)["result_frame"] == 0 and parts == [b"echo:"]
        over = await submit(client, kit, fid, [largest + bytes(1024)])
        assert (
            over.status_code == 413 and over.json()["error"]["reason"] == "task.payload_too_large"
        )

    run(tmp_path, scenario, limits=Limits(max_payload_bytes=limit, max_result_bytes=limit))


def test_bad_frames_are_refused_with_the_reason_and_nothing_is_accepted(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        fid = await register(client, kit)
        cases: list[tuple[bytes, str]] = [
            (b"not frames", "$frames.magic"),
            (body({"tasks": [{"function_id": fid}]}, [b"a", b"b"]), "$frames.count"),
            (body({"tasks": [{"function_id": fid, "args": b64(b"a")}]}, [b"a"]), "$.tasks[0].args"),
            (body({"tasks": [{"function_id": "nothex"}]}, [b"a"]), "$.tasks[0].function_id"),
            (frames.encode(b"{nope", [b"a"]), None),
        ]
        for raw, where in cases:
            r = await client.post(
                "/v1/endpoints/hpc/submit", content=raw, headers=headers(kit, FRAMES)
            )
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["reason"] == "api.bad_request"
            if where is not None:
                assert where in [v["path"] for v in error["violations"]], error
        for raw in (body({}, []), body({}, [b"a", b"b"]), body({"function": b64(b"x")}, [b"x"])):
            r = await client.post("/v1/functions", content=raw, headers=headers(kit, FRAMES))
            assert r.status_code == 400 and r.json()["error"]["reason"] == "api.bad_request"
        # Frames where a route takes only JSON are refused like any other type.
        r = await client.post(
            "/v1/tasks/wait", content=body({"task_ids": []}, []), headers=headers(kit, FRAMES)
        )
        assert r.status_code == 415
        assert kit.pipeline.store.counts_by_state() == {}

    run(tmp_path, scenario)


def test_an_oversized_frames_body_gets_the_body_limit_reason(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        fid = await register(client, kit)
        r = await submit(client, kit, fid, [bytes(5000)])
        assert r.status_code == 413 and r.json()["error"]["reason"] == "api.body_too_large"

    run(tmp_path, scenario, limits=Limits(max_body_bytes=4096))


def test_json_and_frames_callers_side_by_side(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        fid = await register(client, kit)
        old = await client.post(
            "/v1/endpoints/hpc/submit",
            json={"tasks": [{"function_id": fid, "args": b64(b"old")}]},
            headers=headers(kit),
        )
        new = await submit(client, kit, fid, [b"new"])
        ids = [old.json()["task_ids"][0], new.json()["task_ids"][0]]
        got = await finished(client, kit, ids)
        assert [got[i][1] for i in ids] == [b"echo:old", b"echo:new"]
        w = await client.post(
            "/v1/tasks/wait", json={"task_ids": ids, "timeout": 1}, headers=headers(kit)
        )
        assert sorted(base64.b64decode(t["result"]) for t in w.json()["tasks"]) == [
            b"echo:new",
            b"echo:old",
        ]
        assert all("result_frame" not in t for t in w.json()["tasks"])

    run(tmp_path, scenario)


# -- the client -----------------------------------------------------------------------


def echo(value: Any) -> Any:
    return value


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[FakeDaemon]:
    with fake_daemon(tmp_path / "state") as running:
        yield running


class JsonOnlyDaemon:
    """What a daemon without frames does at the edge: any body that is not JSON is a
    415, ``Accept`` is ignored, and answers carry no ``Mep-Features`` (unless
    ``advertise``: as behind a proxy that mixes a newer daemon's answers in)."""

    def __init__(self, app: ASGIApp, *, advertise: bool = False) -> None:
        self.app = app
        self.advertise = advertise
        self.seen: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        kept = [(k, v) for k, v in scope["headers"] if k not in (b"accept",)]
        scope = {**scope, "query_string": b""}  # no ?wait either
        media = dict(scope["headers"]).get(b"content-type", b"application/json").decode()
        self.seen.append(media)
        if media.startswith(frames.MEDIA_TYPE):
            scope = {**scope, "headers": [(k, v) for k, v in kept if k != b"content-type"]}
            scope["headers"].append((b"content-type", b"text/plain"))
        else:
            scope = {**scope, "headers": kept}

        async def strip(message: Message) -> None:
            if message["type"] == "http.response.start" and not self.advertise:
                message["headers"] = [
                    (k, v) for k, v in message["headers"] if k.lower() != b"mep-features"
                ]
            await send(message)

        await self.app(scope, receive, strip)


def test_the_client_sends_and_receives_frames(daemon: FakeDaemon) -> None:
    sent: list[str] = []

    def hook(request: httpx.Request) -> None:
        sent.append(request.headers.get("content-type", ""))

    payload = bytes(range(256)) * 4096  # 1 MiB
    with Client(daemon.url, daemon.token()) as client:
        client._connection().event_hooks["request"].append(hook)
        with Executor("hpc", client=client) as ex:
            assert ex.submit(echo, payload).result(timeout=30) == payload
            assert ex.submit(echo, b"").result(timeout=30) == b""
        assert client.sends_frames
        # The function goes first, as JSON (no answer has listed frames yet); both
        # submits then go as frames.
        bodies = [kind for kind in sent if kind]
        assert bodies[0] == "application/json", sent
        assert bodies[1:].count(frames.MEDIA_TYPE) >= 2, sent


@pytest.mark.parametrize(
    ("advertise", "frames_sent"),
    [
        # No answer listed frames: JSON from the first request on.
        (False, 0),
        # Behind a proxy mixing a newer daemon's answers in: frames once (the answers
        # listed them), refused with 415, JSON ever after; nothing accepted twice.
        (True, 1),
    ],
    ids=["a daemon without frames", "a 415 to frames"],
)
def test_the_client_falls_back_to_json(tmp_path: Path, advertise: bool, frames_sent: int) -> None:
    kit, _ = _pipeline(tmp_path / "state")
    old = JsonOnlyDaemon(create_app(kit.pipeline, kit.pipeline.limits), advertise=advertise)
    server, thread = _serve(old, 0)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        with Client(f"http://127.0.0.1:{port}", kit.token(ALICE)) as client:
            with Executor("hpc", client=client) as ex:
                assert ex.submit(echo, b"\x00\x01").result(timeout=30) == b"\x00\x01"
                assert ex.submit(echo, 7).result(timeout=30) == 7
            assert not client.sends_frames
        assert old.seen.count(frames.MEDIA_TYPE) == frames_sent, old.seen
        assert kit.pipeline.store.counts_by_state() == {"success": 2}
    finally:
        _stop(server, thread)
        kit.pipeline.store.close()


def test_a_client_with_frames_turned_off_speaks_json(daemon: FakeDaemon) -> None:
    with Client(daemon.url, daemon.token(), frames=False) as client:
        with Executor("hpc", client=client) as ex:
            assert ex.submit(echo, b"abc").result(timeout=30) == b"abc"
        assert not client.sends_frames


# -- submit and wait ------------------------------------------------------------------


def test_submit_with_wait_answers_the_results_in_the_same_request(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient, kit: PipelineKit) -> None:
        fid = await register(client, kit)
        header = {"tasks": [{"function_id": fid}, {"function_id": fid}]}
        r = await client.post(
            "/v1/endpoints/hpc/submit?wait=10",
            content=body(header, [b"a", b""]),
            headers=headers(kit, FRAMES, ACCEPT),
        )
        assert r.status_code == 200 and r.headers["content-type"] == frames.MEDIA_TYPE
        raw, parts = frames.decode(r.content)
        answer = json.loads(raw)
        assert len(answer["task_ids"]) == 2 and answer["unknown"] == []
        # At least the first result is there; each id is either final or pending.
        finished = {t["task_id"]: parts[t["result_frame"]] for t in answer["tasks"]}
        assert finished and set(finished) | set(answer["pending"]) == set(answer["task_ids"])
        assert set(finished.values()) <= {b"echo:a", b"echo:"}
        # JSON in, JSON out (base64), same shape.
        r = await client.post(
            "/v1/endpoints/hpc/submit?wait=10",
            json={"tasks": [{"function_id": fid, "args": b64(b"j")}]},
            headers=headers(kit),
        )
        (view,) = r.json()["tasks"]
        assert base64.b64decode(view["result"]) == b"echo:j"
        # A task not final within the wait (none: 0 s) is pending, for the long-poll.
        r = await client.post(
            "/v1/endpoints/hpc/submit?wait=0",
            json={"tasks": [{"function_id": fid, "args": b64(b"held")}]},
            headers=headers(kit),
        )
        assert r.json()["tasks"] == [] and r.json()["pending"] == r.json()["task_ids"]
        for bad in ("-1", "x", "1e9", "nan"):
            r = await client.post(
                f"/v1/endpoints/hpc/submit?wait={bad}",
                json={"tasks": [{"function_id": fid, "args": b64(b"no")}]},
                headers=headers(kit),
            )
            assert r.status_code == 400, bad
            assert [v["path"] for v in r.json()["error"]["violations"]] == ["?wait"]
        assert sum(kit.pipeline.store.counts_by_state().values()) == 4  # none of the bad

    run(tmp_path, scenario)


def test_a_single_executor_call_is_one_request(daemon: FakeDaemon) -> None:
    paths: list[str] = []

    def hook(request: httpx.Request) -> None:
        paths.append(request.url.path)

    with Client(daemon.url, daemon.token()) as client:
        with Executor("hpc", client=client) as ex:
            assert ex.submit(echo, 1).result(timeout=30) == 1  # registers the function
            paths.clear()
            client._connection().event_hooks["request"].append(hook)
            for i in range(3):
                assert ex.submit(echo, b"x" * i).result(timeout=30) == b"x" * i
        assert paths == ["/v1/endpoints/hpc/submit"] * 3


def test_submit_and_wait_with_a_daemon_without_it_leaves_the_tasks_pending(
    tmp_path: Path,
) -> None:
    kit, _ = _pipeline(tmp_path / "state")
    old = JsonOnlyDaemon(create_app(kit.pipeline, kit.pipeline.limits))
    server, thread = _serve(old, 0)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        with Client(f"http://127.0.0.1:{port}", kit.token(ALICE)) as client:
            fid = client.register_function(echo)
            task = TaskRequest.pack(fid, (5,))
            ids, report = client.submit_and_wait("hpc", [task], wait=5)
            assert report.tasks == () and report.pending == tuple(ids)
            assert client.get_result(ids[0], timeout=30) == 5
    finally:
        _stop(server, thread)
        kit.pipeline.store.close()
