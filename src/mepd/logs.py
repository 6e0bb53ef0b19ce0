"""Logging set-up of the daemon: structlog, one JSON object per line on stderr.

This is the only place in the project that calls ``structlog.configure`` (DESIGN.md §1):
library code (mepcore) only obtains loggers. Every line the daemon writes is one JSON
object with ``timestamp`` (RFC 3339, UTC, microseconds: ``rfc3339``, the same format as
the audit log's ``ts``), ``level`` and ``event``:

- structlog events (``area.subject_past``) with their fields, and the id of the request
  being served (``request_id``: ``mepd.api`` opens a ``request_scope`` per request, so
  every line a request causes can be found by it, and the audit log records it too).
  The scope ends with the request: a task the request started that outlives it (a user
  endpoint's reader) does not tag later lines with that request's id;
- string values longer than ``MAX_FIELD_CHARS`` cut, with a marker saying how much was
  left out (an identity of megabytes must not become megabytes of log);
- records of the standard library's loggers — uvicorn's (``uvicorn.error``), asyncio's,
  httpx's — rendered by the same processors through ``structlog.stdlib.ProcessorFormatter``,
  with ``logger`` naming where they came from. Nothing bypasses the JSON: uvicorn gets
  no configuration of its own (``log_config=None``) and its access logger stays off —
  ``mepd.api`` writes the access log (``api.request_completed``: request id, owner,
  route, status, duration).

The admin log is for operators and may carry detail; what a remote caller sees is
decided elsewhere (public messages only). The audit trail is not this log: see
``mepd.audit``. Deliberately not here: log files and rotation (stderr goes to the
journal under systemd), sampling.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator, MutableMapping
from typing import Any

import attrs
import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# Standard-library loggers that are chatty at INFO about things the daemon logs itself.
_QUIET_AT_INFO = ("httpx", "httpcore")


# The last whole second formatted (every audit and log line of a busy second shares it).
_LAST_SECOND: tuple[int, str] = (-1, "")


def rfc3339(epoch: float) -> str:
    """``epoch`` as RFC 3339 in UTC with microseconds: ``2025-01-31T12:00:00.123456Z``.
    The one timestamp format of the daemon log and the audit log."""
    global _LAST_SECOND  # one cached value, replaced whole (safe across threads)
    seconds = int(epoch // 1)
    micros = round((epoch - seconds) * 1_000_000)
    if micros == 1_000_000:
        seconds, micros = seconds + 1, 0
    cached_second, prefix = _LAST_SECOND
    if cached_second != seconds:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _LAST_SECOND = (seconds, prefix)
    return f"{prefix}.{micros:06d}Z"


MAX_FIELD_CHARS = 1024


def cap_text(value: str, limit: int = MAX_FIELD_CHARS) -> str:
    """``value`` cut to ``limit`` characters with a marker of what was left out."""
    if len(value) <= limit:
        return value
    return f"{value[:limit]}...[{len(value) - limit} more characters cut]"


@attrs.define
class _RequestScope:
    request_id: str
    active: bool = True


_REQUEST: contextvars.ContextVar[_RequestScope | None] = contextvars.ContextVar(
    "mepd_request", default=None
)


@contextlib.contextmanager
def request_scope(request_id: str) -> Iterator[None]:
    """While a request is served, ``current_request_id()`` is ``request_id`` — in the
    request's task and in tasks it starts, but only until the request ends."""
    scope = _RequestScope(request_id)
    token = _REQUEST.set(scope)
    try:
        yield
    finally:
        scope.active = False
        _REQUEST.reset(token)


def current_request_id() -> str | None:
    scope = _REQUEST.get()
    return scope.request_id if scope is not None and scope.active else None


def _add_request_id(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    request_id = current_request_id()
    if request_id is not None:
        event.setdefault("request_id", request_id)
    return event


def _cap_fields(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in event.items():
        if type(value) is str and len(value) > MAX_FIELD_CHARS and key != "exception":
            event[key] = cap_text(value)
    return event


@attrs.define(eq=False)
class Throttled:
    """At most one log line per ``interval`` seconds for a recurring event (a flood of
    refusals, a failing ``accept()``), carrying how often it happened since the last."""

    event: str
    logger: Any
    interval: float = 30.0
    _last: float = float("-inf")
    _unlogged: int = 0

    def note(self, **fields: Any) -> None:
        self._unlogged += 1
        now = time.monotonic()
        if now - self._last >= self.interval:
            self.logger.warning(self.event, occurrences=self._unlogged, **fields)
            self._last, self._unlogged = now, 0


def _add_timestamp(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    event["timestamp"] = rfc3339(time.time())
    return event


class _LineSerializer:
    """``json.dumps`` with the renderer's options, its encoder made once (``json.dumps``
    with options makes a new encoder for every line)."""

    def __init__(self) -> None:
        self._encoder: json.JSONEncoder | None = None

    def __call__(self, obj: Any, **options: Any) -> str:
        if self._encoder is None:
            self._encoder = json.JSONEncoder(**options)
        return self._encoder.encode(obj)


def _processors() -> list[Any]:
    """What every line goes through before rendering, structlog's and stdlib's alike."""
    return [
        structlog.contextvars.merge_contextvars,
        _add_request_id,
        structlog.processors.add_log_level,
        _add_timestamp,
        _cap_fields,
    ]


def configure_logging(level: str = "info", *, stream: Any = None) -> None:
    """Send every log line — structlog's and the standard library's — as JSON to
    ``stream`` (stderr), filtered at ``level``."""
    numeric = _LEVELS.get(level, logging.INFO)
    out = stream if stream is not None else sys.stderr
    renderer = structlog.processors.JSONRenderer(serializer=_LineSerializer(), sort_keys=False)
    structlog.configure(
        processors=[
            *_processors(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*_processors(), structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in _QUIET_AT_INFO:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
    # uvicorn's own access log is off (the daemon passes access_log=False); this keeps it
    # off should anything enable it: mepd.api writes the access log.
    logging.getLogger("uvicorn.access").disabled = True
    for name in ("uvicorn", "uvicorn.error"):
        # Propagate to the root handler above, whatever uvicorn set up before.
        named = logging.getLogger(name)
        named.handlers.clear()
        named.propagate = True
