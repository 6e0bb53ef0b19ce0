"""The channel between the daemon and one user endpoint: frames on a socketpair.

A frame is ``u32 length | u32 header length | header (JSON object, UTF-8) | body``; both
lengths are big-endian and ``length`` counts everything after itself. The header carries
the protocol version ``v``, the message ``kind`` and, when the frame has a body, ``sizes``:
the byte lengths of the opaque parts (task or result payloads) concatenated in the body.
One frame carries a *batch* (many task headers and payloads, many results), which is what
makes 10k tasks/s possible without a syscall per task.

Both ends use the same incremental ``FrameDecoder``: the daemon feeds it from an asyncio
protocol (``AsyncChannel``, in ``mepd.channel_async``), the user endpoint from a blocking socket
(``BlockingChannel``). Neither end trusts the other: frame and header sizes are bounded,
the header must be a JSON object of a known version and kind with bounded ``sizes``, and a
malformed frame raises ``ChannelError`` — the caller then ends the connection and logs why.
Per-kind field validation (task ids, start messages…) is done by the code that consumes
the kind, with hand-written checks rather than JSON Schema because this is the hot path.

Deliberately not here: what a payload means. Payloads are opaque bytes on both sides of
this module; only the user endpoint's executor deserializes them (DESIGN.md §3.4).
"""

from __future__ import annotations

import json
import select
import socket
import struct
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from mepcore.errors import ChannelError

if TYPE_CHECKING:
    from mepd.channel_async import AsyncChannel as AsyncChannel


def __getattr__(name: str) -> Any:
    # The daemon's end lives in mepd.channel_async, so that the user endpoint (which
    # uses only the blocking end) never imports asyncio: a faster, smaller start.
    if name == "AsyncChannel":
        from mepd.channel_async import AsyncChannel

        return AsyncChannel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


VERSION = 1
KINDS = frozenset(
    {
        "start",  # daemon -> uep: template, variables, identity, runtime
        "ready",  # uep -> daemon: rendered and serving
        "error",  # uep -> daemon: structured failure (config error, privilege drop…)
        "function",  # daemon -> uep: function bodies (id + payload), sent once
        "task",  # daemon -> uep: a batch of task headers + payloads
        "result",  # uep -> daemon: a batch of result headers + payloads
        "heartbeat",  # uep -> daemon: alive, with idle counters
        "introspect",  # daemon -> uep: request; uep -> daemon: answer (same kind)
        "cancel",  # daemon -> uep: stop these tasks wherever they are (task_ids)
        "drain",  # daemon -> uep: finish in-flight work, accept none, then exit
        "stop",  # daemon -> uep: exit now (after teardown)
        "exiting",  # uep -> daemon: the final frame, saying why the uep exits
        # uep -> daemon (on the adoption socket, first frame): endpoint id, secret, held
        # task ids; daemon -> uep: adopted, with the task ids whose results it wants
        "adopt",
    }
)

_PREFIX = struct.Struct(">II")
# Buffers per sendmsg/writev call: well below IOV_MAX (1024 on Linux).
IOV_BATCH = 512
DEFAULT_MAX_FRAME = 64 * 1024 * 1024
DEFAULT_MAX_HEADER = 16 * 1024 * 1024
DEFAULT_MAX_PARTS = 100_000


@attrs.frozen
class ChannelLimits:
    """Bounds every frame must respect (both directions)."""

    max_frame: int = DEFAULT_MAX_FRAME
    max_header: int = DEFAULT_MAX_HEADER
    max_parts: int = DEFAULT_MAX_PARTS


@attrs.frozen
class Frame:
    """One decoded frame: its header (``kind``, ``v`` and kind-specific fields) and body."""

    header: Mapping[str, Any]
    body: bytes = b""

    @property
    def kind(self) -> str:
        return str(self.header["kind"])

    def parts(self) -> list[bytes]:
        """The opaque parts of the body, split by the header's ``sizes``."""
        sizes: list[int] = self.header.get("sizes") or []
        if len(sizes) == 1 and sizes[0] == len(self.body):
            return [self.body]  # the one part is the body: no copy
        out: list[bytes] = []
        view = memoryview(self.body)
        offset = 0
        for size in sizes:
            out.append(bytes(view[offset : offset + size]))
            offset += size
        return out


def encode_frame(
    kind: str,
    fields: Mapping[str, Any] | None = None,
    parts: Sequence[bytes] = (),
    *,
    limits: ChannelLimits = ChannelLimits(),
) -> list[bytes]:
    """The buffers of one frame, ready for ``writelines``/``sendmsg``.

    Raises ``ChannelError`` (``channel.frame_too_large``) instead of producing a frame the
    other end would refuse.
    """
    if kind not in KINDS:
        raise ChannelError("channel.frame_invalid", f"unknown frame kind {kind!r}")
    header: dict[str, Any] = {"v": VERSION, "kind": kind}
    if fields:
        header.update(fields)
    if parts:
        header["sizes"] = [len(p) for p in parts]
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    body_len = sum(len(p) for p in parts)
    if len(raw) > limits.max_header or 4 + len(raw) + body_len > limits.max_frame:
        raise ChannelError(
            "channel.frame_too_large",
            f"{kind} frame of {4 + len(raw) + body_len} bytes exceeds the limit "
            f"({limits.max_frame} bytes, header {limits.max_header})",
        )
    return [_PREFIX.pack(4 + len(raw) + body_len, len(raw)), raw, *parts]


def batch_frames(
    kind: str,
    items: Sequence[tuple[Mapping[str, Any], bytes]],
    *,
    fields: Mapping[str, Any] | None = None,
    limits: ChannelLimits = ChannelLimits(),
    max_items: int = 5000,
) -> list[list[bytes]]:
    """Pack (header, payload) items into as few frames as the limits allow.

    Each frame's header has ``items`` (the item headers, in order) and ``sizes``. An item
    that cannot fit a frame on its own raises ``channel.frame_too_large``.
    """
    frames: list[list[bytes]] = []
    start = 0
    # Headers are small; budget the body conservatively so that the JSON of the item
    # headers never pushes a frame over the limit.
    budget = limits.max_frame - min(limits.max_header, limits.max_frame // 4)
    while start < len(items):
        end = start
        body = 0
        while end < len(items) and end - start < max_items:
            size = len(items[end][1])
            if end > start and body + size > budget:
                break
            body += size
            end += 1
        chunk = items[start:end]
        payload = dict(fields or {})
        payload["items"] = [dict(h) for h, _ in chunk]
        frames.append(encode_frame(kind, payload, [p for _, p in chunk], limits=limits))
        start = end
    return frames


# Body pieces at least this long are kept by reference until the frame is whole (one
# copy when it is joined); shorter ones are gathered into a bytearray, so that a peer
# writing a byte at a time cannot make the list of pieces long.
_BY_REFERENCE = 16 * 1024


def gather(buffers: Iterable[bytes]) -> list[bytes | memoryview]:
    """The buffers of a frame as they are to be written: runs of short ones joined
    (one small copy), long ones (payloads) as they are, so that a large payload is
    handed to the kernel without being copied into a joined frame first."""
    out: list[bytes | memoryview] = []
    run: list[bytes] = []
    for buffer in buffers:
        if len(buffer) >= _BY_REFERENCE:
            if run:
                out.append(b"".join(run))
                run = []
            out.append(buffer)
        elif buffer:
            run.append(buffer)
    if run:
        out.append(b"".join(run))
    return out


def advance(buffers: list[bytes | memoryview], sent: int) -> list[bytes | memoryview]:
    """What is left of ``buffers`` once their first ``sent`` bytes are written."""
    index = 0
    while index < len(buffers) and sent >= len(buffers[index]):
        sent -= len(buffers[index])
        index += 1
    rest = buffers[index:]
    if sent:
        rest[0] = memoryview(rest[0])[sent:]
    return rest


class FrameDecoder:
    """Incremental decoder: feed bytes, get complete frames; raises on malformed input.

    A frame's prefix and header are checked as soon as they have arrived, before its body
    is read. The body is not gathered in one growing buffer: a body that one ``feed``
    holds whole is cut from it with one copy (none when ``data`` is exactly the body),
    and one that arrives over many feeds is kept as the pieces received and joined once,
    when its last byte arrives.
    """

    def __init__(self, limits: ChannelLimits = ChannelLimits()) -> None:
        self._limits = limits
        self._head = bytearray()  # the prefix and header of the next frame, while partial
        self._header: dict[str, Any] | None = None  # the header whose body is being read
        self._body_len = 0
        self._pieces: list[bytes | bytearray | memoryview] = []
        self._have = 0  # body bytes in _pieces
        self._error: ChannelError | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Frames completed by ``data``. Frames before a malformed one are still returned;
        the error is raised by this call when there are none, else by ``check``/the next
        call (the connection is to be ended either way)."""
        self.check()
        if type(data) is not bytes:
            data = bytes(data)  # pieces are kept by reference: they must not change
        frames: list[Frame] = []
        try:
            self._consume(data, frames)
        except ChannelError as exc:
            # Where the bad frame ends is unknown: nothing after it can be read either.
            self._error = exc
            if not frames:
                raise
        return frames

    def check(self) -> None:
        """Raise the error found after the last frames returned, if any."""
        if self._error is not None:
            raise self._error

    @property
    def pending(self) -> int:
        """Bytes received that do not yet make a whole frame."""
        return len(self._head) + self._have

    def _consume(self, data: bytes, frames: list[Frame]) -> None:
        view = memoryview(data)
        at = 0
        while at < len(data):
            if self._header is None:
                at = self._read_head(view, at, frames)
            else:
                at = self._read_body(data, view, at, frames)

    def _prefix(self, buf: bytes | bytearray | memoryview, at: int) -> tuple[int, int]:
        length, header_len = _PREFIX.unpack_from(buf, at)
        if length > self._limits.max_frame:
            raise ChannelError(
                "channel.frame_too_large",
                f"frame of {length} bytes exceeds the limit of {self._limits.max_frame}",
            )
        if header_len > self._limits.max_header or header_len + 4 > length:
            raise ChannelError("channel.frame_invalid", f"bad header length {header_len}")
        return int(length), int(header_len)

    def _read_head(self, view: memoryview, at: int, frames: list[Frame]) -> int:
        head = self._head
        if not head and len(view) - at >= _PREFIX.size:
            # The usual case: the whole head is in this piece, read in place.
            length, header_len = self._prefix(view, at)
            stop = at + _PREFIX.size + header_len
            if stop <= len(view):
                self._begin(bytes(view[at + _PREFIX.size : stop]), length, frames)
                return stop
        # Gather the head across pieces: the prefix first, then the header it announces.
        while True:
            need = _PREFIX.size
            if len(head) >= _PREFIX.size:
                need += self._prefix(head, 0)[1]
            if len(head) >= need:
                break
            if at == len(view):
                return at
            take = min(need - len(head), len(view) - at)
            head += view[at : at + take]
            at += take
        length, _ = self._prefix(head, 0)
        raw = bytes(head[_PREFIX.size :])
        head.clear()
        self._begin(raw, length, frames)
        return at

    def _begin(self, raw: bytes, length: int, frames: list[Frame]) -> None:
        """A frame's header has arrived: check it, and its sizes against the body length
        the prefix announced, before any of the body is read."""
        header = _parse_header(raw)
        body_len = length - 4 - len(raw)
        _check_sizes(header, body_len, self._limits)
        if body_len == 0:
            frames.append(Frame(header))
            return
        self._header, self._body_len = header, body_len

    def _read_body(self, data: bytes, view: memoryview, at: int, frames: list[Frame]) -> int:
        missing = self._body_len - self._have
        take = min(missing, len(data) - at)
        if take == missing and not self._pieces:
            # The whole body is in this piece: one copy, or none when it is all of it.
            body = data if take == len(data) else bytes(view[at : at + take])
        else:
            self._keep(data, view, at, take)
            if take < missing:
                return at + take
            body = b"".join(self._pieces)
            self._pieces, self._have = [], 0
        assert self._header is not None
        frames.append(Frame(self._header, body))
        self._header, self._body_len = None, 0
        return at + take

    def _keep(self, data: bytes, view: memoryview, at: int, take: int) -> None:
        self._have += take
        if take >= _BY_REFERENCE:
            self._pieces.append(data if take == len(data) else view[at : at + take])
            return
        last = self._pieces[-1] if self._pieces else None
        if isinstance(last, bytearray):
            last += view[at : at + take]
        else:
            self._pieces.append(bytearray(view[at : at + take]))


def _parse_header(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ChannelError("channel.frame_invalid", f"header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ChannelError("channel.frame_invalid", "header is not a JSON object")
    if header.get("v") != VERSION:
        raise ChannelError("channel.frame_invalid", f"unsupported version {header.get('v')!r}")
    if header.get("kind") not in KINDS:
        raise ChannelError("channel.frame_invalid", f"unknown kind {header.get('kind')!r}")
    return header


def _check_sizes(header: Mapping[str, Any], body_len: int, limits: ChannelLimits) -> None:
    sizes = header.get("sizes")
    if sizes is None:
        if body_len:
            raise ChannelError("channel.frame_invalid", "body without sizes")
        return
    if not isinstance(sizes, list) or len(sizes) > limits.max_parts:
        raise ChannelError("channel.frame_invalid", "sizes must be a bounded list")
    total = 0
    for size in sizes:
        if type(size) is not int or size < 0:
            raise ChannelError("channel.frame_invalid", "sizes must be non-negative integers")
        total += size
    if total != body_len:
        raise ChannelError("channel.frame_invalid", "sizes do not add up to the body length")
    items = header.get("items")
    if items is not None and (not isinstance(items, list) or len(items) != len(sizes)):
        raise ChannelError("channel.frame_invalid", "items and sizes differ in length")


def check_items(
    frame: Frame, *, id_field: str = "task_id", max_id: int = 256
) -> list[dict[str, Any]]:
    """The ``items`` of a batch frame, each a JSON object with a bounded string id."""
    items = frame.header.get("items")
    sizes = frame.header.get("sizes")
    if not isinstance(items, list) or not isinstance(sizes, list) or len(items) != len(sizes):
        raise ChannelError("channel.frame_invalid", f"{frame.kind} frame without items")
    for item in items:
        if not isinstance(item, dict):
            raise ChannelError("channel.frame_invalid", "an item header is not an object")
        ident = item.get(id_field)
        if not isinstance(ident, str) or not 0 < len(ident) <= max_id:
            raise ChannelError("channel.frame_invalid", f"an item has no valid {id_field}")
    return items


# --------------------------------------------------------------------------- blocking side


class BlockingChannel:
    """The user endpoint's end: a blocking socket; ``send`` is safe from several threads."""

    def __init__(self, sock: socket.socket, limits: ChannelLimits = ChannelLimits()) -> None:
        self.sock = sock
        self.limits = limits
        self._decoder = FrameDecoder(limits)
        self._ready: list[Frame] = []
        self._send_lock = threading.Lock()
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)
        self.eof = False

    def send(
        self, kind: str, fields: Mapping[str, Any] | None = None, parts: Sequence[bytes] = ()
    ) -> None:
        self.send_buffers(encode_frame(kind, fields, parts, limits=self.limits))

    def send_buffers(self, buffers: Sequence[bytes]) -> None:
        pending = gather(buffers)
        with self._send_lock:
            while pending:
                # Scatter-gather: the payloads go from where they are, without a join.
                sent = self.sock.sendmsg(pending[:IOV_BATCH])
                pending = advance(pending, sent)

    def recv(self, timeout: float | None = None) -> Frame | None:
        """The next frame; None on timeout. Raises EOFError when the peer closed."""
        if self._ready:
            return self._ready.pop(0)
        if self.eof:
            raise EOFError("channel closed")
        self._decoder.check()
        wait_ms = None if timeout is None else max(0, int(timeout * 1000))
        while True:
            if not self._poll.poll(wait_ms):
                return None
            try:
                data = self.sock.recv(1 << 20)
            except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                continue
            if not data:
                self.eof = True
                raise EOFError("channel closed")
            frames = self._decoder.feed(data)
            if frames:
                self._ready.extend(frames[1:])
                return frames[0]
            # Only part of a frame so far: keep reading (a tick may come late by at most
            # one timeout, which the heartbeat logic tolerates).
