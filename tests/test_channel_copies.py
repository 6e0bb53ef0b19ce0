"""The channel's large-payload paths: bodies gathered from pieces, early refusals, and
frames written without joining (scatter-gather on both ends).

No processes or root: socketpairs in this process, a thread for the blocking end.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import threading
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mepcore.errors import ChannelError
from mepd.channel import (
    AsyncChannel,
    BlockingChannel,
    ChannelLimits,
    Frame,
    FrameDecoder,
    advance,
    encode_frame,
    gather,
)

BIG = os.urandom(300 * 1024)  # above the size kept by reference (16 KiB)


def wire(
    kind: str, fields: dict[str, Any] | None = None, parts: list[bytes] | None = None
) -> bytes:
    return b"".join(encode_frame(kind, fields, parts or []))


def prefix_and_header(header: dict[str, Any], body_len: int) -> bytes:
    head = json.dumps(header).encode()
    return struct.pack(">II", 4 + len(head) + body_len, len(head)) + head


def feed_all(decoder: FrameDecoder, pieces: list[bytes]) -> list[Frame]:
    out: list[Frame] = []
    for piece in pieces:
        out.extend(decoder.feed(piece))
    return out


STREAM_PARTS = [b"a" * 10, BIG, b"", b"tail"]
STREAM = (
    wire("heartbeat", {"idle": 1})
    + wire("result", {"items": [{"task_id": f"t{i}"} for i in range(4)]}, STREAM_PARTS)
    + wire("drain")
)


def check_stream(frames: list[Frame]) -> None:
    assert [f.kind for f in frames] == ["heartbeat", "result", "drain"]
    assert frames[0].header["idle"] == 1
    assert frames[1].parts() == STREAM_PARTS
    assert frames[2].body == b""


def test_a_stream_split_at_every_byte_boundary_decodes_the_same() -> None:
    # Every cut in the first 600 bytes (prefix, header, body start) and then every
    # 997th: each one a two-piece feed, the cut anywhere in a prefix, header or body.
    cuts = [*range(len(STREAM) if len(STREAM) < 600 else 600), *range(600, len(STREAM), 997)]
    for cut in cuts:
        decoder = FrameDecoder()
        check_stream(feed_all(decoder, [STREAM[:cut], STREAM[cut:]]))
        assert decoder.pending == 0


def test_a_stream_fed_a_byte_at_a_time_around_the_frame_edges_decodes_the_same() -> None:
    decoder = FrameDecoder()
    body_start = STREAM.index(b"a" * 10)
    # Byte by byte through both heads, large pieces through the body, byte by byte again
    # over its end and the next frame.
    end = len(STREAM) - len(wire("drain")) - 200
    pieces = [STREAM[i : i + 1] for i in range(body_start + 5)]
    pieces += [STREAM[i : min(i + 70_000, end)] for i in range(body_start + 5, end, 70_000)]
    pieces += [STREAM[i : i + 1] for i in range(end, len(STREAM))]
    assert b"".join(pieces) == STREAM
    check_stream(feed_all(decoder, pieces))
    assert decoder.pending == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=200_000), min_size=1, max_size=40))
def test_any_chunking_of_large_bodies_decodes_the_same(sizes: list[int]) -> None:
    pieces = []
    at = 0
    for size in sizes:
        pieces.append(STREAM[at : at + size])
        at += size
    pieces.append(STREAM[at:])
    decoder = FrameDecoder()
    check_stream(feed_all(decoder, pieces))
    assert decoder.pending == 0


def test_a_body_fed_as_one_piece_is_the_frame_body_and_its_one_part() -> None:
    head = prefix_and_header({"v": 1, "kind": "result", "sizes": [len(BIG)]}, len(BIG))
    decoder = FrameDecoder()
    assert decoder.feed(head) == []
    (frame,) = decoder.feed(BIG)
    assert frame.body is BIG  # not copied
    assert frame.parts()[0] is BIG


def test_a_bytearray_fed_is_copied_so_that_reusing_it_changes_nothing() -> None:
    data = bytearray(wire("task", {"items": [{"task_id": "a"}]}, [BIG]))
    decoder = FrameDecoder()
    half = len(data) // 2
    first = bytearray(data[:half])
    assert decoder.feed(first) == []
    first[:] = b"\0" * len(first)  # a reader reusing its receive buffer
    (frame,) = decoder.feed(bytearray(data[half:]))
    assert frame.parts() == [BIG]


def test_a_frame_over_the_limit_is_refused_from_its_prefix() -> None:
    decoder = FrameDecoder(ChannelLimits(max_frame=1 << 20))
    with pytest.raises(ChannelError) as info:
        decoder.feed(struct.pack(">II", (1 << 20) + 1, 10))
    assert info.value.reason == "channel.frame_too_large"
    # The connection is to be ended: nothing after the refusal is read as a frame.
    with pytest.raises(ChannelError):
        decoder.feed(wire("drain"))


def test_a_bad_header_is_refused_before_its_body_arrives() -> None:
    body_len = 8 << 20
    for header, reason in [
        ({"v": 1, "kind": "result", "sizes": [5]}, "channel.frame_invalid"),
        ({"v": 1, "kind": "result"}, "channel.frame_invalid"),
        ({"v": 2, "kind": "result", "sizes": [body_len]}, "channel.frame_invalid"),
    ]:
        decoder = FrameDecoder()
        with pytest.raises(ChannelError) as info:
            # The prefix and header, and a first slice of the announced 8 MiB body.
            decoder.feed(prefix_and_header(header, body_len) + b"x" * 1000)
        assert info.value.reason == reason


def test_a_bad_header_length_is_refused_split_or_whole() -> None:
    bad = struct.pack(">II", 100, 200) + b"{}"
    for cut in range(len(bad) + 1):
        decoder = FrameDecoder()
        with pytest.raises(ChannelError) as info:
            feed_all(decoder, [bad[:cut], bad[cut:]])
        assert info.value.reason == "channel.frame_invalid"


@pytest.mark.parametrize(
    "garbage",
    [
        struct.pack(">II", 1 << 30, 10),
        prefix_and_header({"v": 1, "kind": "bogus"}, 0),
        prefix_and_header({"v": 1, "kind": "task", "sizes": [3]}, 4) + b"body",
    ],
)
def test_frames_before_a_malformed_one_are_returned_then_the_error(garbage: bytes) -> None:
    good = wire("heartbeat") + wire("result", {"items": [{"task_id": "a"}]}, [BIG])
    decoder = FrameDecoder()
    frames = decoder.feed(good + garbage + wire("drain"))
    assert [f.kind for f in frames] == ["heartbeat", "result"]
    assert frames[1].parts() == [BIG]
    with pytest.raises(ChannelError):
        decoder.check()
    with pytest.raises(ChannelError):
        decoder.feed(wire("drain"))

    # The same with the good frames' last piece and the garbage in one later feed.
    decoder = FrameDecoder()
    assert [f.kind for f in decoder.feed(good[:-1000])] == ["heartbeat"]
    (late,) = decoder.feed(good[-1000:] + garbage)
    assert late.parts() == [BIG]
    with pytest.raises(ChannelError):
        decoder.check()


def test_gather_joins_short_runs_and_keeps_payloads_as_they_are() -> None:
    small = [b"ab", b"", b"cd"]
    out = gather([*small, BIG, b"ef", BIG])
    assert out[0] == b"abcd" and out[1] is BIG and out[2] == b"ef" and out[3] is BIG
    assert gather([]) == []


def test_advance_skips_what_was_written() -> None:
    buffers: list[bytes | memoryview] = [b"abc", b"defg", b"hi"]
    assert [bytes(b) for b in advance(buffers, 0)] == [b"abc", b"defg", b"hi"]
    assert [bytes(b) for b in advance(buffers, 3)] == [b"defg", b"hi"]
    assert [bytes(b) for b in advance(buffers, 5)] == [b"fg", b"hi"]
    assert advance(buffers, 9) == []
    assert [bytes(b) for b in advance([memoryview(b"xyz")[1:]], 1)] == [b"z"]


def test_the_blocking_end_writes_a_large_frame_a_slow_reader_takes_in_pieces() -> None:
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
    ours.settimeout(30)  # then sendmsg returns what the socket took, not all
    theirs.settimeout(30)
    sender = BlockingChannel(ours)
    payloads = [os.urandom(3 << 20), b"small", os.urandom(200_000)]
    items = [{"task_id": f"t{i}"} for i in range(len(payloads))]
    thread = threading.Thread(target=sender.send, args=("result", {"items": items}, payloads))
    thread.start()
    decoder = FrameDecoder()
    frames: list[Frame] = []
    while not frames:
        data = theirs.recv(5000)  # small reads: the sender's sendmsg returns partial counts
        assert data
        frames = decoder.feed(data)
    thread.join(10)
    assert frames[0].parts() == payloads
    ours.close()
    theirs.close()


def test_the_async_end_writes_large_frames_in_order_behind_a_full_socket() -> None:
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
    theirs.settimeout(30)
    payloads = [os.urandom(2 << 20), b"one", os.urandom(100_000), b"two"]
    expected = sum(len(wire("task", {"items": [{"task_id": "t0"}]}, [p])) for p in payloads)
    chunks: list[bytes] = []
    started = threading.Event()

    def read() -> None:
        taken = 0
        while taken < expected:
            chunks.append(theirs.recv(1 << 16))
            taken += len(chunks[-1])
            started.set()

    async def scenario() -> None:
        channel = await AsyncChannel.connect(ours, lambda frame: None, lambda exc: None)
        thread = threading.Thread(target=read)
        thread.start()
        channel.send("task", {"items": [{"task_id": "t0"}]}, [payloads[0]])
        # The reader has made room in the socket while most of the first frame still
        # waits in the transport (the loop has not run since): the next frames must
        # queue behind it, not go straight into the socket.
        assert started.wait(10)
        for index, payload in enumerate(payloads[1:], start=1):
            channel.send("task", {"items": [{"task_id": f"t{index}"}]}, [payload])
        deadline = asyncio.get_running_loop().time() + 20
        while thread.is_alive() and asyncio.get_running_loop().time() < deadline:
            await asyncio.to_thread(thread.join, 0.05)
        channel.close()

    asyncio.run(scenario())
    frames = FrameDecoder().feed(b"".join(chunks))
    assert [f.parts() for f in frames] == [[p] for p in payloads]
    ours.close()
    theirs.close()
