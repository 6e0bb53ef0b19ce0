"""Logging set-up of the daemon: structlog, one JSON object per line on stderr.

This is the only place in the project that calls ``structlog.configure`` (DESIGN.md §1):
library code (mepcore) only obtains loggers. Every line the daemon writes is one JSON
object with ``timestamp`` (RFC 3339, UTC, microseconds: ``rfc3339``, the same format as
the audit log's ``ts``), ``level`` and ``event``:

- structlog events (``area.subject_past``) with their fields, and the context bound for
  the current request (``request_id``: ``mepd.api`` binds it, so every line a request
  causes can be found by it);
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

import logging
import sys
import time
from collections.abc import MutableMapping
from typing import Any

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# Standard-library loggers that are chatty at INFO about things the daemon logs itself.
_QUIET_AT_INFO = ("httpx", "httpcore")


def rfc3339(epoch: float) -> str:
    """``epoch`` as RFC 3339 in UTC with microseconds: ``2025-01-31T12:00:00.123456Z``.
    The one timestamp format of the daemon log and the audit log."""
    seconds = int(epoch // 1)
    micros = round((epoch - seconds) * 1_000_000)
    if micros == 1_000_000:
        seconds, micros = seconds + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{micros:06d}Z"


def _add_timestamp(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    event["timestamp"] = rfc3339(time.time())
    return event


def _processors() -> list[Any]:
    """What every line goes through before rendering, structlog's and stdlib's alike."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _add_timestamp,
    ]


def configure_logging(level: str = "info", *, stream: Any = None) -> None:
    """Send every log line — structlog's and the standard library's — as JSON to
    ``stream`` (stderr), filtered at ``level``."""
    numeric = _LEVELS.get(level, logging.INFO)
    out = stream if stream is not None else sys.stderr
    renderer = structlog.processors.JSONRenderer(sort_keys=False)
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
