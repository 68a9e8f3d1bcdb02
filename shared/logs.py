"""Logging: structlog, JSON lines off a TTY, readable console lines on one.

Services bind request context with ``structlog.contextvars.bound_contextvars(request_id=...)`` so
every line of a request carries it, and log one canonical line per request when it ends.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure(service: str, *, level: str | None = None, json: bool | None = None) -> structlog.stdlib.BoundLogger:
    level_name = (level or os.environ.get("ISERVE_LOG_LEVEL") or "info").upper()
    lvl = getattr(logging, level_name, logging.INFO)
    if json is None:
        env = os.environ.get("ISERVE_LOG_JSON")
        json = (env.lower() in ("1", "true", "yes")) if env else not sys.stderr.isatty()
    processors: list = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json:
        processors += [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
    else:
        processors += [structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service)
    return structlog.get_logger()


def get() -> structlog.stdlib.BoundLogger:
    return structlog.get_logger()
