"""JSON encoding and decoding. The only module that imports orjson."""

from __future__ import annotations

from typing import Any

import orjson

from .errors import MalformedMessage

__all__ = ["dumps", "loads_object"]


def dumps(value: Any) -> bytes:
    """Encode ``value`` as compact UTF-8 JSON (datetimes as RFC 3339, pydantic models not accepted)."""
    return orjson.dumps(value)


def loads_object(body: bytes) -> dict[str, Any]:
    """Decode ``body`` as one UTF-8 JSON object.

    Raises :class:`MalformedMessage` for invalid UTF-8, invalid JSON or a non-object top level.
    """
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # orjson reports invalid UTF-8 as a decode error too; keep its position info.
        raise MalformedMessage(f"body is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise MalformedMessage(f"body must be a JSON object, got {type(value).__name__}")
    return value
