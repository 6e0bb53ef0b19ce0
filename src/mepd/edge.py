"""The HTTP edge: who may hold a connection, for how long, and what happens at the limits.

mepd serves HTTP with uvicorn and its httptools protocol. uvicorn alone leaves four
holes a service facing the network must close, and this module closes them in a thin
layer of our own around uvicorn's protocol, not in a different server:

- **Header deadline.** uvicorn has only a keep-alive timeout, reset by every byte, so a
  connection that never finishes its headers stays open for ever. ``EdgeProtocol``
  (uvicorn's ``HttpToolsProtocol`` with three parser callbacks extended) starts a timer
  when the connection opens and when the first byte of each later request arrives, and
  closes the connection when the headers are not complete by ``header_timeout`` (with a
  JSON 408 if part of a request came).
- **Body deadline.** When the headers are in, the request gets a deadline for its body
  (``scope["mep.body_deadline"]``): ``mepd.api`` answers 408 if the body it reads is
  late; a body nobody reads is cut off by the protocol a little after the deadline.
- **Connection caps.** ``Edge`` accepts connections itself (not ``loop.create_server``),
  counts them in total and per peer address, and answers one over a cap with a JSON 503
  ``api.too_many_connections`` and closes it. The total cap defaults to half the
  process's file-descriptor limit, so the cap is met before the descriptors run out.
- **EMFILE.** asyncio's own accept loop logs every failed ``accept()`` of a batch with
  a traceback and schedules a retry for each (on Python 3.11 a daemon at its descriptor
  limit wrote ~130 MB of log in 10 s and burned a core). ``Edge`` stops watching the
  listening socket, retries after a back-off that doubles up to ``MAX_BACKOFF`` seconds,
  and logs one line per ``LOG_INTERVAL`` (how many failures it saw meanwhile).

The server's own protocol errors (a request httptools cannot parse) are answered in the
same JSON error format as the API's, with an ``X-Request-ID``.

Why not another server: hypercorn's ``read_timeout`` is a per-read idle timeout (one
byte a second keeps it alive), it has no per-peer cap, and it accepts through the same
asyncio loop; granian and others would mean a second HTTP stack for one feature. The
hooks used here (``connection_made``, ``on_message_begin``, ``on_headers_complete``,
``on_message_complete``, ``send_400_response``) are the protocol's public callbacks;
tests/test_edge_connections.py keeps them honest against the installed uvicorn.

Deliberately not here: per-identity rate limits (``mepd.ratelimit``, after
authentication) and anything about request content (``mepd.api``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import resource
import socket
import ssl
import uuid
from collections.abc import Callable
from typing import Any

import attrs
import structlog
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from mepcore.errors import MepError
from mepd.api import BODY_DEADLINE, RETRY_LATER, public_error, status_for
from mepd.logs import Throttled
from mepd.settings import EdgeSettings

log = structlog.get_logger("mepd.edge")

ACCEPT_BATCH = 64
MIN_BACKOFF = 0.05
MAX_BACKOFF = 1.0
LOG_INTERVAL = 30.0
# A body nobody reads is cut off this long after its deadline (the API answers first).
BODY_GRACE = 1.0
# Longest pause of reading a connection whose request was refused by the rate limit.
MAX_RETRY_PAUSE = 1.0
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def default_max_connections() -> int:
    """Half the soft file-descriptor limit (the rest: store, audit, user endpoints)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 65536
    return max(8, min(65536, soft // 2))


def raw_error(reason: str, *, close: bool = True, retry_after: int | None = None) -> bytes:
    """A complete HTTP/1.1 error answer in mepd's JSON format, for the edge's own refusals
    (written before or without the application)."""
    status = status_for(reason)
    body = json.dumps({"error": public_error(MepError(reason))}).encode()
    phrase = {400: "Bad Request", 408: "Request Timeout", 503: "Service Unavailable"}
    lines = [
        f"HTTP/1.1 {status} {phrase.get(status, 'Error')}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        f"x-request-id: {uuid.uuid4().hex}",
    ]
    if retry_after is not None:
        lines.append(f"retry-after: {retry_after}")
    if close:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


@attrs.define(eq=False)
class _Slot:
    """One admitted connection's place in the counts; given back exactly once."""

    edge: Edge
    peer: str
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.edge.release(self.peer)


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline, a body deadline, a place in
    the edge's counts, and JSON answers to unparsable requests."""

    def __init__(self, *args: Any, slot: _Slot, settings: EdgeSettings, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.edge_slot = slot
        self.edge_settings = settings
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._in_headers = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        self.edge_slot.release()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        if self._header_timer is None:  # a later request on a kept-alive connection
            self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._in_headers = False
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        deadline = self.loop.time() + self.edge_settings.body_timeout
        self.scope[BODY_DEADLINE] = deadline  # type: ignore[literal-required]
        super().on_headers_complete()
        if self.pipeline:
            # Queued behind a request still being answered (HTTP pipelining): its body is
            # not read until then, so its deadline starts when the API reads it.
            self.scope.pop(BODY_DEADLINE, None)  # type: ignore[misc]
        else:
            self._body_timer = self.loop.call_at(deadline + BODY_GRACE, self._body_late)

    def on_message_complete(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()

    def on_response_complete(self) -> None:
        # A request refused by the rate limit (``scope["mep.retry_later"]``, the
        # Retry-After it was given): this connection is not read again before then (at
        # most MAX_RETRY_PAUSE s). A client that honours Retry-After never notices; one
        # that floods waits in its own socket buffer instead of costing the event loop.
        cycle = self.cycle
        super().on_response_complete()
        pause = cycle.scope.get(RETRY_LATER) if cycle is not None else None
        if isinstance(pause, int) and pause > 0 and not self.transport.is_closing():
            self.transport.pause_reading()
            self.loop.call_later(min(pause, MAX_RETRY_PAUSE), self._read_again)

    def _read_again(self) -> None:
        if not self.transport.is_closing() and not self.flow.read_paused:
            self.transport.resume_reading()

    def send_400_response(self, msg: str) -> None:
        # httptools could not parse the request: the same JSON error as the API's.
        self.transport.write(raw_error("api.bad_request"))
        self.transport.close()

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(
            self.edge_settings.header_timeout, self._headers_late
        )

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self._in_headers:  # part of a request came: say why it is cut off
            self.transport.write(raw_error("api.request_timeout"))
        self.transport.close()

    def _body_late(self) -> None:
        self._body_timer = None
        if not self.transport.is_closing():
            self.transport.close()


ProtocolFactory = Callable[[_Slot], asyncio.Protocol]


@attrs.define(eq=False)
class Edge:
    """The accept loop: caps, back-off on resource errors, throttled log lines."""

    settings: EdgeSettings
    max_connections: int
    ssl_context: ssl.SSLContext | None = None
    total: int = 0
    per_peer: dict[str, int] = attrs.field(factory=dict)
    refused: int = 0
    _sock: socket.socket | None = None
    _factory: ProtocolFactory | None = None
    _retry: asyncio.TimerHandle | None = None
    _backoff: float = 0.0
    _accept_failed: Throttled = attrs.field(
        factory=lambda: Throttled("edge.accept_failed", log, LOG_INTERVAL)
    )
    _over_cap: Throttled = attrs.field(
        factory=lambda: Throttled("edge.connections_refused", log, LOG_INTERVAL)
    )

    @classmethod
    def from_settings(cls, settings: EdgeSettings, ssl_context: ssl.SSLContext | None) -> Edge:
        cap = settings.max_connections or default_max_connections()
        return cls(settings, cap, ssl_context)

    def start(self, sock: socket.socket, factory: ProtocolFactory) -> None:
        self._sock, self._factory = sock, factory
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept)
        log.info(
            "edge.started",
            max_connections=self.max_connections,
            max_connections_per_peer=self.settings.max_connections_per_peer,
            header_timeout=self.settings.header_timeout,
            body_timeout=self.settings.body_timeout,
        )

    def stop(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._sock is not None and self._sock.fileno() >= 0:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self._sock.fileno())

    def release(self, peer: str) -> None:
        self.total -= 1
        left = self.per_peer.get(peer, 1) - 1
        if left > 0:
            self.per_peer[peer] = left
        else:
            self.per_peer.pop(peer, None)

    def _accept(self) -> None:
        assert self._sock is not None
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                self._pause(exc)
                return
            self._backoff = 0.0
            self._admit(conn, addr)

    def _pause(self, exc: OSError) -> None:
        """Stop accepting for a while: a resource error repeats at once if retried."""
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._sock.fileno())
        self._backoff = min(MAX_BACKOFF, max(MIN_BACKOFF, self._backoff * 2))
        self._retry = loop.call_later(self._backoff, self._resume)
        self._accept_failed.note(
            error=errno.errorcode.get(exc.errno or 0, str(exc.errno)),
            resource=exc.errno in _RESOURCE_ERRORS,
            connections=self.total,
            retry_in=self._backoff,
        )

    def _resume(self) -> None:
        self._retry = None
        if self._sock is not None and self._sock.fileno() >= 0:
            asyncio.get_running_loop().add_reader(self._sock.fileno(), self._accept)

    def _admit(self, conn: socket.socket, addr: Any) -> None:
        peer = str(addr[0]) if isinstance(addr, tuple) else "local"
        if (
            self.total >= self.max_connections
            or self.per_peer.get(peer, 0) >= self.settings.max_connections_per_peer
        ):
            self._refuse(conn, peer)
            return
        conn.setblocking(False)
        self.total += 1
        self.per_peer[peer] = self.per_peer.get(peer, 0) + 1
        slot = _Slot(self, peer)
        assert self._factory is not None
        protocol = self._factory(slot)
        loop = asyncio.get_running_loop()
        task = loop.create_task(
            loop.connect_accepted_socket(
                lambda: protocol,
                conn,
                ssl=self.ssl_context,
                ssl_handshake_timeout=self.settings.header_timeout if self.ssl_context else None,
            )
        )
        task.add_done_callback(lambda done: _connected(done, slot, conn))

    def _refuse(self, conn: socket.socket, peer: str) -> None:
        self.refused += 1
        with contextlib.suppress(OSError):
            conn.setblocking(False)
            if self.ssl_context is None:  # over TLS there is no session to answer in
                conn.send(raw_error("api.too_many_connections", retry_after=1))
        conn.close()
        self._over_cap.note(peer=peer, connections=self.total, peer_connections=self.per_peer)


def _connected(done: asyncio.Task[Any], slot: _Slot, conn: socket.socket) -> None:
    """A connection that never reached its protocol (a failed TLS handshake) gives its
    place back here; one that did gives it back when it is lost."""
    if done.cancelled() or done.exception() is not None:
        slot.release()
        with contextlib.suppress(OSError):
            conn.close()


class EdgeServer(uvicorn.Server):
    """uvicorn's server with ``Edge`` accepting its connections, and without uvicorn's
    signal handling (the daemon drains first, then stops it)."""

    def __init__(self, config: uvicorn.Config, settings: EdgeSettings) -> None:
        super().__init__(config)
        self.edge_settings = settings
        self.edge: Edge | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await self.lifespan.startup()
        config = self.config
        self.edge = Edge.from_settings(self.edge_settings, config.ssl)

        def protocol(slot: _Slot) -> asyncio.Protocol:
            return EdgeProtocol(
                config=config,
                server_state=self.server_state,
                app_state=self.lifespan.state,
                slot=slot,
                settings=self.edge_settings,
            )

        self.servers = []
        for sock in sockets or []:
            self.edge.start(sock, protocol)
        self.started = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.edge is not None:
            self.edge.stop()
        await super().shutdown(sockets=sockets)
