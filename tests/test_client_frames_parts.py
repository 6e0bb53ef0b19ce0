"""The client sends a frames body as its parts (large payloads not joined into one
body first), and what arrives is exactly the one-piece encoding the daemon decodes."""

from __future__ import annotations

import json
import os

import httpx
import pytest

from mepcore.client import Client, RetryPolicy, pack_args
from mepcore.client import frames as client_frames
from mepd import frames as daemon_frames

FAST = RetryPolicy(attempts=4, deadline=10.0, initial_wait=0.001, max_wait=0.002)
FID = "a" * 64
SUBMIT = "/v1/endpoints/hpc/submit"


@pytest.mark.parametrize(
    "sizes", [[], [0], [5], [64 * 1024 - 1], [64 * 1024], [3, 300_000, 7, 0, 200_000, 1]]
)
def test_parts_join_to_the_body_the_daemon_decodes(sizes: list[int]) -> None:
    payloads = [os.urandom(size) for size in sizes]
    header = {"tasks": [{"function_id": FID}] * len(payloads)}
    parts = client_frames.encode_parts(header, payloads)
    body = b"".join(parts)
    assert body == client_frames.encode(header, payloads)
    raw, frames = daemon_frames.decode(body)
    assert json.loads(raw) == header and frames == payloads
    # Large payloads are parts of their own, the very objects given (not copies).
    large = [p for p in payloads if len(p) >= 64 * 1024]
    assert [p for p in parts if any(p is q for q in large)] == large
    assert len(parts) <= 2 * len(large) + 1


def test_a_retried_frames_submit_sends_the_whole_body_again_with_its_length() -> None:
    big = os.urandom(1 << 20)
    seen: list[httpx.Request] = []
    answers = [
        httpx.Response(200, json={"task_ids": ["t0"]}, headers={"Mep-Features": "frames"}),
        httpx.Response(503, json={"error": {"reason": "api.shutting_down", "message": "x"}}),
        httpx.Response(200, json={"task_ids": ["t1"]}, headers={"Mep-Features": "frames"}),
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        return answers.pop(0)

    client = Client("http://mep.test", "tok", transport=httpx.MockTransport(handler), retry=FAST)
    assert client.submit("hpc", FID, (1,)) == "t0"  # JSON: the daemon's features unknown
    assert client.sends_frames
    assert client.submit("hpc", FID, (big,)) == "t1"
    first, second = seen[1], seen[2]
    assert first.url.path == second.url.path == SUBMIT
    assert first.content == second.content
    for request in (first, second):
        assert request.headers["content-type"] == client_frames.MEDIA_TYPE
        assert int(request.headers["content-length"]) == len(request.content)
        assert "transfer-encoding" not in request.headers
        _, frames = daemon_frames.decode(request.content)
        assert frames == [pack_args((big,), {})]
