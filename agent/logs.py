"""Logging: structlog key-value events, JSON lines for journald, readable text on a terminal.

Standard-library loggers (paho, onnxruntime's Python side) are routed through the same
renderer, so one daemon writes one format.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

LEVELS = ("debug", "info", "warning", "error")


def configure_logging(
    level: str = "info", *, json_output: bool | None = None, stream: TextIO | None = None
) -> None:
    """Set up structlog and the stdlib root logger.

    ``json_output`` defaults to JSON when ``stream`` is not a terminal (systemd/journald,
    pipes, CI) and colourless console output when it is.
    """
    out = stream if stream is not None else sys.stdout
    if json_output is None:
        json_output = not out.isatty()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_output
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    final: list[Any] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if json_output:
        final.append(structlog.processors.format_exc_info)
    final.append(renderer)
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=final,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    # Library warnings (onnxruntime warns about unavailable providers) become log events
    # instead of stray text on stderr.
    logging.captureWarnings(True)
    set_log_level(level)


def set_log_level(level: str) -> None:
    """Change the level of every logger at once (also used on config reload)."""
    logging.getLogger().setLevel(level.upper())
