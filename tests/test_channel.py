"""The channel's frame codec and its two ends, without processes or root."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mepcore.errors import ChannelError
from mepd.channel import (
    AsyncChannel,
    BlockingChannel,
    ChannelLimits,
    Frame,
    FrameDecoder,
    batch_frames,
    check_items,
    encode_frame,
)


def raw(header: Any, body: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return struct.pack(">II", 4 + len(head) + len(body), len(head)) + head + body


def test_round_trip_with_parts() -> None:
    data = b"".join(
        encode_frame("task", {"items": [{"task_id": "a"}, {"task_id": "b"}]}, [b"12", b"345"])
    )
    (frame,) = FrameDecoder().feed(data)
    assert frame.kind == "task"
    assert frame.parts() == [b"12", b"345"]
    assert check_items(frame) == [{"task_id": "a"}, {"task_id": "b"}]


@given(
    st.lists(st.tuples(st.text(min_size=1, max_size=20), st.binary(max_size=300)), max_size=40),
    st.integers(min_value=1, max_value=97),
)
def test_batches_survive_any_chunking(items: list[tuple[str, bytes]], chunk: int) -> None:
    pairs = [({"task_id": name}, payload) for name, payload in items]
    limits = ChannelLimits(max_frame=2048, max_header=1024)
    frames = batch_frames("result", pairs, limits=limits, max_items=7) if pairs else []
    stream = b"".join(b"".join(f) for f in frames)
    decoder = FrameDecoder(limits)
    got: list[Frame] = []
    for i in range(0, len(stream), chunk):
        got.extend(decoder.feed(stream[i : i + chunk]))
    assert decoder.pending == 0
    out = [(h, p) for f in got for h, p in zip(check_items(f), f.parts(), strict=True)]
    assert out == pairs
    assert all(len(f.header["items"]) <= 7 for f in got)


@given(st.binary(max_size=200))
def test_garbage_never_crashes_the_decoder(data: bytes) -> None:
    decoder = FrameDecoder(ChannelLimits(max_frame=1 << 16, max_header=1 << 12))
    # Either outcome is fine (frames, or a refusal with a reason code); a crash is not.
    error: ChannelError | None = None
    frames: list[Frame] = []
    try:
        frames = decoder.feed(data)
    except ChannelError as exc:
        error = exc
    if error is not None:
        assert error.reason in ("channel.frame_invalid", "channel.frame_too_large")
    assert all(f.kind for f in frames)


def test_batches_split_by_size() -> None:
    limits = ChannelLimits(max_frame=4000, max_header=1000)
    pairs = [({"task_id": f"t{i}"}, b"x" * 1000) for i in range(7)]
    frames = batch_frames("task", pairs, limits=limits)
    assert len(frames) > 1
    assert all(sum(len(b) for b in f) <= 4000 for f in frames)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (struct.pack(">II", 1 << 30, 10), "channel.frame_too_large"),
        (raw({"v": 2, "kind": "task"}), "channel.frame_invalid"),
        (raw({"v": 1, "kind": "rm -rf"}), "channel.frame_invalid"),
        (raw([1, 2]), "channel.frame_invalid"),
        (struct.pack(">II", 8, 4) + b"{{{{", "channel.frame_invalid"),
        (struct.pack(">II", 6, 9) + b"{}", "channel.frame_invalid"),
        (raw({"v": 1, "kind": "task"}, b"body"), "channel.frame_invalid"),
        (raw({"v": 1, "kind": "task", "sizes": [3]}, b"body"), "channel.frame_invalid"),
        (raw({"v": 1, "kind": "task", "sizes": [-1, 5]}, b"body"), "channel.frame_invalid"),
        (
            raw({"v": 1, "kind": "task", "sizes": [4], "items": []}, b"body"),
            "channel.frame_invalid",
        ),
        (raw({"v": 1, "kind": "task", "sizes": [True, 3]}, b"body"), "channel.frame_invalid"),
        (
            raw({"v": 1, "kind": "heartbeat", "x": [[[[[[[[[[1]]]]]]]]]]}).replace(
                b"[1]", b"[" * 5000 + b"]" * 5000
            ),
            "channel.frame_invalid",
        ),
    ],
)
def test_malformed_frames_are_refused(data: bytes, reason: str) -> None:
    with pytest.raises(ChannelError) as info:
        FrameDecoder(ChannelLimits(max_frame=1 << 20, max_header=1 << 16)).feed(data)
    assert info.value.reason == reason


def test_items_need_bounded_ids() -> None:
    frame = Frame({"v": 1, "kind": "result", "items": [{"task_id": "x" * 300}], "sizes": [0]})
    with pytest.raises(ChannelError):
        check_items(frame)
    with pytest.raises(ChannelError):
        check_items(Frame({"v": 1, "kind": "result", "items": [5], "sizes": [0]}))


def test_encoder_refuses_what_the_peer_would_refuse() -> None:
    with pytest.raises(ChannelError) as info:
        encode_frame(
            "task", {}, [b"x" * 2000], limits=ChannelLimits(max_frame=1000, max_header=500)
        )
    assert info.value.reason == "channel.frame_too_large"
    with pytest.raises(ChannelError):
        encode_frame("nonsense")


def test_async_and_blocking_ends_talk_and_a_malformed_frame_closes_the_connection() -> None:
    ours, theirs = socket.socketpair()
    peer = BlockingChannel(theirs)
    received: list[Frame] = []
    closed: list[BaseException | None] = []

    def echo() -> None:
        frame = peer.recv(timeout=10)
        assert frame is not None
        peer.send("result", {"items": frame.header["items"]}, frame.parts())
        theirs.sendall(raw({"v": 1, "kind": "bogus"}))  # then garbage

    async def scenario() -> None:
        channel = await AsyncChannel.connect(ours, received.append, closed.append)
        thread = threading.Thread(target=echo)
        thread.start()
        channel.send("task", {"items": [{"task_id": "a"}]}, [b"payload"])
        await asyncio.wait_for(channel.closed_event.wait(), 10)
        thread.join(10)

    asyncio.run(scenario())
    theirs.close()
    assert [f.parts() for f in received] == [[b"payload"]]
    assert len(closed) == 1 and isinstance(closed[0], ChannelError)


def test_blocking_end_reports_timeout_and_eof() -> None:
    ours, theirs = socket.socketpair()
    end = BlockingChannel(theirs)
    assert end.recv(timeout=0.01) is None
    ours.sendall(b"".join(encode_frame("stop", {"reason": "x"})) + b"".join(encode_frame("drain")))
    first = end.recv(timeout=1)
    second = end.recv(timeout=1)
    assert first is not None and first.header["reason"] == "x"
    assert second is not None and second.kind == "drain"
    ours.close()
    with pytest.raises(EOFError):
        end.recv(timeout=1)
    theirs.close()
