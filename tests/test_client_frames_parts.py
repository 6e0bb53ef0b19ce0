"""A frames submit that is retried sends the whole body again, with its length, and
what arrives is what the daemon decodes.

The body stays one joined ``bytes``: sending it as its parts (no copy of the payload)
was measured for issue 22 and cost the client more CPU on glibc's default allocator
settings, about twice the page faults per 1 MiB round trip: the joined buffer is the
memory later megabyte buffers of the round trip reuse."""

from __future__ import annotations

import os

import httpx

from mepcore.client import Client, RetryPolicy, pack_args
from mepcore.client import frames as client_frames
from mepd import frames as daemon_frames

FAST = RetryPolicy(attempts=4, deadline=10.0, initial_wait=0.001, max_wait=0.002)
FID = "a" * 64
SUBMIT = "/v1/endpoints/hpc/submit"


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
