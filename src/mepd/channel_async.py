"""The daemon's end of the channel (``mepd.channel``): an asyncio protocol.

Kept apart from ``mepd.channel`` so that the user endpoint, which uses only the
blocking end, never imports asyncio (and ssl with it): about 20 ms and 6 MiB less per
start. ``mepd.channel.AsyncChannel`` still names this class (imported on first use).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from mepcore.errors import ChannelError
from mepd.channel import (
    IOV_BATCH,
    ChannelLimits,
    Frame,
    FrameDecoder,
    advance,
    encode_frame,
    gather,
)


class AsyncChannel(asyncio.Protocol):
    """The daemon's end: an asyncio protocol calling ``on_frame`` for each frame.

    ``on_frame`` and ``on_close`` run in the event loop. A malformed frame closes the
    connection; ``on_close`` then receives the ``ChannelError`` (or None on a clean EOF,
    or the OSError of a broken connection).
    """

    def __init__(
        self,
        on_frame: Callable[[Frame], None],
        on_close: Callable[[BaseException | None], None],
        limits: ChannelLimits = ChannelLimits(),  # noqa: B008 - frozen, so sharing is safe
    ) -> None:
        self._on_frame = on_frame
        self._on_close = on_close
        self.limits = limits
        self._decoder = FrameDecoder(limits)
        self._transport: asyncio.Transport | None = None
        self._fd: int | None = None
        self._error: BaseException | None = None
        self._closed = False
        self.closed_event = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    @classmethod
    async def connect(
        cls,
        sock: socket.socket,
        on_frame: Callable[[Frame], None],
        on_close: Callable[[BaseException | None], None],
        limits: ChannelLimits = ChannelLimits(),  # noqa: B008 - frozen, so sharing is safe
    ) -> AsyncChannel:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_unix_connection(
            lambda: cls(on_frame, on_close, limits), sock=sock
        )
        return protocol

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        self._fd = None if sock is None else sock.fileno()

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        try:
            frames = self._decoder.feed(data)
        except ChannelError as exc:
            self._error = exc
            self.close()
            return
        for frame in frames:
            if self._closed:
                return
            self._on_frame(frame)
        try:
            self._decoder.check()
        except ChannelError as exc:
            self._error = exc
            self.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._transport = None
        self._writable.set()
        self.closed_event.set()
        self._on_close(self._error or exc)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # API
    @property
    def is_closed(self) -> bool:
        return self._closed or self._transport is None

    def send(
        self, kind: str, fields: Mapping[str, Any] | None = None, parts: Sequence[bytes] = ()
    ) -> None:
        self.send_buffers(encode_frame(kind, fields, parts, limits=self.limits))

    def send_buffers(self, buffers: Iterable[bytes]) -> None:
        transport = self._transport
        if transport is None or self._closed:
            raise ChannelError("channel.closed", "the channel to the user endpoint is closed")
        pending = gather(buffers)
        if self._fd is not None and not (
            transport.is_closing() or transport.get_write_buffer_size()
        ):
            pending = self._write_now(self._fd, pending)
        # The rest waits in the transport's buffer, which flow control watches. (Its
        # writelines would join the buffers first: one large copy more.)
        for rest in pending:
            transport.write(rest)

    @staticmethod
    def _write_now(fd: int, pending: list[bytes | memoryview]) -> list[bytes | memoryview]:
        """Write what the socket takes now, straight from the frame's buffers; the
        transport's buffer is empty, so nothing written before is overtaken."""
        while pending:
            batch = pending[:IOV_BATCH]
            try:
                sent = os.writev(fd, batch)
            except (BlockingIOError, InterruptedError):
                return pending
            except OSError:
                return pending  # the transport meets the error too, and ends the connection
            pending = advance(pending, sent)
            if sent < sum(len(b) for b in batch):
                return pending
        return pending

    def read_pending(self, limit: int = 256 * 1024 * 1024) -> None:
        """Deliver whatever the peer already wrote, now (no waiting; bounded by ``limit``).

        Used when the peer process is known to have exited: its last results and its
        ``exiting`` frame may still sit in the socket buffer, and they must be handled
        before the connection is declared lost.
        """
        if self._transport is None or self._closed:
            return
        sock = self._transport.get_extra_info("socket")
        if sock is None:
            return
        fd = sock.fileno()
        taken = 0
        while taken < limit and not self._closed:
            try:
                data = os.read(fd, 1 << 20)  # the socket is non-blocking under asyncio
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if not data:
                return
            taken += len(data)
            self.data_received(data)

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""
        await self._writable.wait()

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
