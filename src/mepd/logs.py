"""Logging set-up of the daemon: structlog, one JSON object per line on stderr.

This is the only place in the project that calls ``structlog.configure`` (DESIGN.md §1):
library code (mepcore) only obtains loggers. The admin log is for operators and may
carry detail; what a remote caller sees is decided elsewhere (public messages only).
The audit trail is not this log: see ``mepd.audit``.
"""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(level: str = "info") -> None:
    """Send structlog events as JSON lines to stderr, filtered at ``level``."""
    numeric = _LEVELS.get(level, logging.INFO)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # uvicorn logs through the standard library; keep its access log out (the metrics
    # count requests) and its errors on stderr.
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr)
    logging.getLogger("uvicorn.access").disabled = True
