"""systemd's service notification protocol (``sd_notify(3)``), written here in a few lines.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``, a Unix datagram socket (a path,
or an abstract name written with a leading ``@``); the service sends newline-separated
``KEY=VALUE`` assignments to it, one datagram each time. mepd sends:

- ``READY=1`` (with ``STATUS=``) once the HTTP server accepts connections and the port
  file is written — ``systemctl start`` returns then, and units ordered after mepd start;
- ``RELOADING=1`` (with ``MONOTONIC_USEC=``) and ``READY=1`` again around a reload;
- ``STOPPING=1`` when a drain begins (SIGTERM);
- ``WATCHDOG=1`` every half of ``$WATCHDOG_USEC`` when the unit sets ``WatchdogSec=``
  (and ``$WATCHDOG_PID``, if set, is this process), from the event loop: a daemon whose
  loop hangs stops sending and systemd restarts it.

Why not a library: the maintained binding (``systemd-python``) is a C extension that
needs libsystemd's headers and a compiler to install, and the pure-Python packages are
unmaintained; the protocol is one ``sendto`` on a datagram socket, stable and documented
(``sd_notify(3)``), and this module is smaller than the glue a binding would need. Without
``$NOTIFY_SOCKET`` (not under systemd, ``Type=exec``) every call does nothing. A failed
send is logged and otherwise ignored: notification must never take the daemon down.
Deliberately not here: file descriptor passing (``FDSTORE``), socket activation,
``AF_VSOCK`` addresses (logged as unsupported).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import attrs
import structlog

log = structlog.get_logger("mepd.notify")


def _address(value: str) -> str | None:
    """The socket address of ``$NOTIFY_SOCKET``: a path, or ``@name`` for an abstract one."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


@attrs.frozen
class Notifier:
    """Where to send notifications (None: not under systemd) and how often the watchdog
    wants ``WATCHDOG=1`` (None: no watchdog)."""

    address: str | None = None
    watchdog_interval: float | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str], pid: int | None = None) -> Notifier:
        """From ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID`` (the process
        environment of ``mepd serve``; ``pid`` is this process's, for the watchdog)."""
        raw = environ.get("NOTIFY_SOCKET", "")
        address = _address(raw) if raw else None
        if raw and address is None:
            log.warning("systemd.notify_unsupported", notify_socket=raw)
        interval = None
        usec = environ.get("WATCHDOG_USEC", "")
        owner = environ.get("WATCHDOG_PID", "")
        me = os.getpid() if pid is None else pid
        mine = not owner or (owner.isdigit() and int(owner) == me)
        if address is not None and usec.isdigit() and int(usec) > 0 and mine:
            interval = int(usec) / 2_000_000
        return cls(address, interval)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **assignments: str | int) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; True if it was sent."""
        if self.address is None:
            return False
        message = "".join(f"{key}={value}\n" for key, value in assignments.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message.encode(), self.address)
        except OSError as exc:
            log.warning("systemd.notify_failed", message=message.strip(), error=str(exc))
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(READY=1, STATUS=status)

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd (Type=notify-reload, ≥ 253) match this reload.
        return self.send(
            RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        )

    def stopping(self, status: str = "draining") -> bool:
        return self.send(STOPPING=1, STATUS=status)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)
