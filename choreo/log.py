"""Logging setup. The only module that imports structlog."""

from __future__ import annotations

import contextvars
import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
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

__all__ = [
    "configure",
    "debug_enabled",
    "get_logger",
    "level_from_env",
    "merge_message_fields",
    "message_fields",
    "reset_message_fields",
]

# The fields of the message being processed in this task. One ContextVar holding a mapping,
# merged into a log line only when a line is written: setting it costs a fraction of a
# microsecond per message, where structlog's bound_contextvars costs about ten.
_message: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar("choreo_message", default=None)


def message_fields(fields: Mapping[str, Any] | None) -> contextvars.Token[Mapping[str, Any] | None]:
    """Make ``fields`` part of every log line of this task (choreo's and the handler's own)
    until the returned token is passed to :func:`reset_message_fields`."""
    return _message.set(fields)


def reset_message_fields(token: contextvars.Token[Mapping[str, Any] | None]) -> None:
    _message.reset(token)


def merge_message_fields(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: adds the current message's fields (explicit keys win)."""
    fields = _message.get()
    if fields:
        for key, value in fields.items():
            if value is not None:
                event_dict.setdefault(key, value)
    return event_dict


_state = {"configured": False}


def configure(*, json: bool | None = None, level: int | None = None) -> None:
    """JSON lines when not on a terminal (or ``json=True``), readable key=value on one."""
    as_json = (not sys.stderr.isatty()) if json is None else json
    renderer: Any = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            merge_message_fields,
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


def debug_enabled(logger: Any) -> bool:
    """Whether ``logger`` writes debug lines now; True when it cannot tell (a logger that does
    not filter by level). Read once, so the message path can skip building a debug call (a
    lazy structlog logger binds a fresh logger on every call, even one filtered out)."""
    check = getattr(logger, "is_enabled_for", None)
    if check is None:
        return True
    try:
        return bool(check(logging.DEBUG))
    except Exception:  # a wrapper with another signature: log as asked
        return True


def get_logger(name: str) -> Any:
    if not _state["configured"]:
        configure()
    return structlog.get_logger(name)
