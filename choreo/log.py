"""Logging setup. The only module that imports structlog."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# structlog.dev imports rich (and pygments) for pretty tracebacks whenever rich is installed,
# several MB per worker process; our console renderer does not need it. Hide rich while
# structlog loads, unless something imported it already.
_hide_rich = "rich" not in sys.modules
if _hide_rich:
    sys.modules["rich"] = None  # type: ignore[assignment]
try:
    import structlog
finally:
    if _hide_rich:
        del sys.modules["rich"]

__all__ = ["bound", "configure", "get_logger", "level_from_env"]

_state = {"configured": False}


def configure(*, json: bool | None = None, level: int | None = None) -> None:
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
        wrapper_class=structlog.make_filtering_bound_logger(level_from_env() if level is None else level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    _state["configured"] = True


def level_from_env(default: int = logging.INFO) -> int:
    """``CHOREO_LOG_LEVEL`` (debug, info, warning, error) or ``default``."""
    name = os.environ.get("CHOREO_LOG_LEVEL", "").strip().upper()
    level = logging.getLevelName(name) if name else default
    return level if isinstance(level, int) else default


@contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Every log line in this block (this task only) carries ``fields``: the message path binds
    agent, event type, event id, trace id and causation id, and handlers' own structlog lines
    get them too."""
    with structlog.contextvars.bound_contextvars(**{k: v for k, v in fields.items() if v is not None}):
        yield


def get_logger(name: str) -> Any:
    if not _state["configured"]:
        configure()
    return structlog.get_logger(name)
