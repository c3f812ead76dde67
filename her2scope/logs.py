"""Logging for every her2scope process (the daemon, the recorder, the viewer), configured once by the entry point:
pretty on a terminal, JSON lines otherwise (journald)."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(json_lines: bool | None = None, level: int = logging.INFO) -> None:
    """Route structlog to stderr: coloured console lines on a TTY, one JSON object per line otherwise."""
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
