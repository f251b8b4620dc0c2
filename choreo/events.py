"""Typed events: a pydantic payload model bound to an event type name.

    class OrderPlaced(choreo.Event, type="order.placed"):
        order_id: str

The class *is* the payload schema; the envelope around it is added by choreo.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .envelope import TYPE_PATTERN, describe_validation_error
from .errors import ConfigError, SchemaInvalid

__all__ = ["Event", "EventRegistry"]

_TYPE_RE = re.compile(TYPE_PATTERN)
_MODEL_VALIDATE = BaseModel.model_validate.__func__  # type: ignore[attr-defined]


class Event(BaseModel):
    """Base class of every event payload.

    Class keywords: ``type`` (required, the wire type name) and ``ttl_ms`` (default staleness
    for events of this class; None means never stale).
    """

    model_config = ConfigDict(frozen=True)

    __event_type__: ClassVar[str]
    __event_ttl_ms__: ClassVar[int | None] = None

    def __init_subclass__(cls, *, type: str | None = None, ttl_ms: int | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if type is None:  # an intermediate base, or a subclass inheriting its parent's type
            return
        if not _TYPE_RE.fullmatch(type):
            raise ConfigError(f"event type {type!r} of {cls.__name__} must match {TYPE_PATTERN}")
        cls.__event_type__ = type
        if ttl_ms is not None:
            if ttl_ms < 1:
                raise ConfigError(f"ttl_ms of {cls.__name__} must be >= 1")
            cls.__event_ttl_ms__ = ttl_ms

    @classmethod
    def event_type(cls) -> str:
        try:
            return cls.__event_type__
        except AttributeError:
            raise ConfigError(
                f"{cls.__name__} declares no event type: class {cls.__name__}(Event, type='a.b')"
            ) from None

    def to_payload(self) -> dict[str, Any]:
        """The envelope's ``payload``: ``model_dump(mode="json")``. Straight through the
        class's pydantic-core serializer (less than half the cost of ``model_dump``'s own
        argument handling), unless the class overrides ``model_dump``."""
        cls = type(self)
        if cls.model_dump is not BaseModel.model_dump:
            return self.model_dump(mode="json")
        payload: dict[str, Any] = cls.__pydantic_serializer__.to_python(self, mode="json")
        return payload

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Any:
        """Validate ``payload`` into an instance; raises :class:`SchemaInvalid` with a short reason."""
        try:
            # Straight to the pydantic-core validator (model_validate's own argument handling is
            # an eighth of the cost), unless the class overrides model_validate.
            # (a staticmethod or other plain callable override has no __func__)
            if getattr(cls.model_validate, "__func__", None) is not _MODEL_VALIDATE:
                return cls.model_validate(payload)
            return cls.__pydantic_validator__.validate_python(payload)
        except ValidationError as exc:
            raise SchemaInvalid(f"payload of {cls.event_type()}: {describe_validation_error(exc)}") from exc
        except Exception as exc:  # a custom validator raising anything else is still a bad payload
            raise SchemaInvalid(f"payload of {cls.event_type()}: {type(exc).__name__}: {exc}") from exc


class EventRegistry:
    """Maps type names to event classes; refuses two classes for one name."""

    def __init__(self) -> None:
        self._by_type: dict[str, type[Event]] = {}

    def add(self, cls: type[Event]) -> None:
        name = cls.event_type()
        existing = self._by_type.get(name)
        if existing is not None and existing is not cls:
            raise ConfigError(f"event type {name!r} is bound to both {existing.__qualname__} and {cls.__qualname__}")
        self._by_type[name] = cls

    def get(self, name: str) -> type[Event] | None:
        return self._by_type.get(name)

    def __iter__(self) -> Iterator[type[Event]]:
        return iter(self._by_type.values())

    def __len__(self) -> int:
        return len(self._by_type)
