"""Logging setup. The only module that imports structlog."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

__all__ = ["configure", "get_logger"]

_state = {"configured": False}


def configure(*, json: bool | None = None, level: int = logging.INFO) -> None:
    """JSON lines when not on a terminal (or ``json=True``), readable key=value on one."""
    as_json = (not sys.stderr.isatty()) if json is None else json
    renderer: Any = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    _state["configured"] = True


def get_logger(name: str) -> Any:
    if not _state["configured"]:
        configure()
    return structlog.get_logger(name)
