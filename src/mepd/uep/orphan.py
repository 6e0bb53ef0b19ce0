"""The user endpoint's side of re-adoption: outliving the daemon, and finding the next.

Only when the start message carries ``adoption`` (the daemon's ``restart.adopt_endpoints``):
the parent-death signal is disarmed (``clear_parent_death_signal``); results go through a
``ResultBuffer``; and when the channel ends, ``reconnect`` is tried with a growing pause
until the grace period ends: connect to the adoption socket, check that the listener is
the daemon's uid (``SO_PEERCRED``: nobody else can have bound that path, but a check
costs nothing), send ``adopt`` with the endpoint id, the secret and the ids of the tasks
held here, and wait for the daemon's ``adopt`` answer naming the results it wants.

``ResultBuffer`` keeps (bounded by ``result_buffer_bytes``) the results produced while no
daemon listens, and the results *sent* in the last ``REPLAY_SECONDS`` (at most
``REPLAY_BYTES`` of them): a daemon killed
with ``kill -9`` may have received those without committing them, so they are offered
again; the next daemon asks only for the ones it still has open. Past the bound, a
result's payload is dropped and it becomes a failed result with reason
``task.result_buffer_full`` (the task ends, with a clear reason, instead of the memory of
a login node filling up; spilling to disk was not chosen: the user's quota may be full
too, and a file in the user's home would outlive the endpoint on a crash).

Deliberately not here: verifying the endpoint (the daemon does, ``mepd.adoption``).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import socket
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from mepcore.errors import ChannelError
from mepd.channel import BlockingChannel

REPLAY_SECONDS = 60.0
# What is kept for a replay while a daemon listens (the buffer's own bound applies too):
# memory a busy adoptable endpoint holds at all times, so kept small.
REPLAY_BYTES = 16 * 1024 * 1024
HANDSHAKE_TIMEOUT = 30.0
_PR_SET_PDEATHSIG = 1


@attrs.frozen
class AdoptionInfo:
    """The ``adoption`` fields of the start message."""

    endpoint_id: str
    socket: str
    secret: str
    daemon_uid: int
    grace_period: float
    result_buffer_bytes: int

    @classmethod
    def from_start(cls, header: Mapping[str, Any]) -> AdoptionInfo | None:
        """None when the daemon does not adopt; ValueError when the fields are wrong."""
        raw = header.get("adoption")
        if raw is None:
            return None
        if not isinstance(raw, dict):
            raise ValueError("adoption must be an object")
        try:
            info = cls(
                endpoint_id=str(raw["endpoint_id"]),
                socket=str(raw["socket"]),
                secret=str(raw["secret"]),
                daemon_uid=int(raw["daemon_uid"]),
                grace_period=float(raw["grace_period"]),
                result_buffer_bytes=int(raw["result_buffer_bytes"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"adoption: {exc}") from exc
        if not info.socket.startswith("/") or not 0 < info.grace_period <= 86400:
            raise ValueError("adoption: bad socket path or grace period")
        return info


def clear_parent_death_signal() -> bool:
    """Outlive the daemon (it was armed before the start message said otherwise)."""
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(_PR_SET_PDEATHSIG, 0, 0, 0, 0)) == 0


def _failed_result(result: Any, reason: str, message: str) -> Any:
    from mepcore.tasks import RemoteError, ResultEnvelope

    now = time.time()
    return ResultEnvelope(
        task_id=result.task_id,
        status="failed",
        error=RemoteError.of(reason, message),
        received=now,
        started=now,
        finished=now,
    )


@attrs.define
class ResultBuffer:
    """Results not yet delivered, and those delivered lately (for a replay). Callers
    hold their own lock (the writer thread and the main loop share it)."""

    limit: int
    connected: bool = True
    _pending: list[Any] = attrs.field(factory=list)
    _pending_bytes: int = 0
    _recent: collections.deque[tuple[float, Any]] = attrs.field(factory=collections.deque)
    _recent_bytes: int = 0

    def hold(self, results: Iterable[Any]) -> None:
        for result in results:
            size = len(result.payload)
            if self._pending_bytes + size > self.limit:
                result = _failed_result(
                    result,
                    "task.result_buffer_full",
                    "the result was produced while the daemon was away, and the user "
                    "endpoint's result buffer (restart.result_buffer_bytes) was full",
                )
                size = 0
            self._pending.append(result)
            self._pending_bytes += size

    def sent(self, results: Iterable[Any], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for result in results:
            self._recent.append((now, result))
            self._recent_bytes += len(result.payload)
        while self._recent and (
            self._recent[0][0] < now - REPLAY_SECONDS
            or self._recent_bytes > min(self.limit, REPLAY_BYTES)
        ):
            _, old = self._recent.popleft()
            self._recent_bytes -= len(old.payload)

    def ids(self) -> set[str]:
        return {r.task_id for r in self._pending} | {r.task_id for _, r in self._recent}

    def take(self, want: set[str]) -> list[Any]:
        """The results the daemon wants (buffered ones first, then recent ones); the
        buffer is emptied."""
        chosen: dict[str, Any] = {}
        for result in self._pending:
            if result.task_id in want:
                chosen.setdefault(result.task_id, result)
        for _, result in self._recent:
            if result.task_id in want:
                chosen.setdefault(result.task_id, result)
        self._pending.clear()
        self._pending_bytes = 0
        self._recent.clear()
        self._recent_bytes = 0
        return list(chosen.values())


def reconnect(info: AdoptionInfo, held: Sequence[str]) -> tuple[BlockingChannel, set[str]] | None:
    """One attempt: the new channel and the task ids the daemon wants, or None."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(HANDSHAKE_TIMEOUT)
        sock.connect(info.socket)
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", raw)
        if uid != info.daemon_uid:
            raise ConnectionRefusedError(f"the adoption socket is uid {uid}'s")
        channel = BlockingChannel(sock)
        channel.send(
            "adopt", {"endpoint_id": info.endpoint_id, "secret": info.secret, "held": list(held)}
        )
        answer = channel.recv(timeout=HANDSHAKE_TIMEOUT)
        want = None if answer is None else answer.header.get("want")
        if answer is None or answer.kind != "adopt" or not isinstance(want, list):
            raise ConnectionRefusedError("no adopt answer")
        sock.settimeout(None)
        return channel, {t for t in want if isinstance(t, str)}
    except (OSError, EOFError, ChannelError):
        with contextlib.suppress(OSError):
            sock.close()
        return None
