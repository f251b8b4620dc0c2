"""The envelope of wire format v1 (see ``docs/wire-format.md``).

The body on the wire is authoritative; this model is how choreo reads and writes it.
``schemas/envelope.v1.json`` is generated from :class:`Envelope` and checked in.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, ValidationError

from . import codec
from .errors import SchemaInvalid

__all__ = ["TYPE_PATTERN", "Envelope", "format_timestamp", "parse_envelope"]

TYPE_PATTERN = r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$"
TRACE_ID_PATTERN = r"^[0-9a-f]{32}$"
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:[Zz]|[+-]\d{2}:\d{2})")


def _rfc3339(value: object) -> object:
    """Accept only RFC 3339 text (pydantic alone would also take Unix timestamps)."""
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or _RFC3339.fullmatch(value) is None:
        raise ValueError("must be an RFC 3339 timestamp such as 2026-11-20T10:00:00.123Z")
    return value


class Envelope(BaseModel):
    """One event as it travels: identity, causality, staleness and the payload.

    Unknown top-level fields are kept (``extra="allow"``) for forward compatibility.
    """

    model_config = ConfigDict(
        extra="allow",
        frozen=True,
        title="choreo envelope v1",
        json_schema_extra={"$id": "https://choreo.dev/schemas/envelope.v1.json"},
    )

    id: Annotated[str, Field(min_length=1, max_length=128, description="Unique event id (choreo uses UUIDv7).")]
    type: Annotated[str, Field(pattern=TYPE_PATTERN, description="Event name; the routing key when first published.")]
    source: Annotated[str, Field(min_length=1, description="Name of the producing service or agent.")]
    issued_at: Annotated[
        AwareDatetime, BeforeValidator(_rfc3339), Field(description="RFC 3339 UTC timestamp of issue.")
    ]
    trace_id: Annotated[str, Field(pattern=TRACE_ID_PATTERN, description="W3C trace-id of the causal tree.")]
    causation_id: Annotated[str | None, Field(description="Id of the event whose handling produced this one.")] = None
    correlation_id: Annotated[str | None, Field(description="Conversation / saga id; null means the root's id.")] = None
    dedup_key: Annotated[str | None, Field(description="What consumers deduplicate on; null means `id`.")] = None
    ttl_ms: Annotated[StrictInt | None, Field(ge=1, description="Stale once now > issued_at + ttl_ms.")] = None
    payload: Annotated[dict[str, Any], Field(description="The event's data, validated against its schema.")]

    @property
    def effective_dedup_key(self) -> str:
        return self.dedup_key if self.dedup_key is not None else self.id

    @property
    def effective_correlation_id(self) -> str:
        return self.correlation_id if self.correlation_id is not None else self.id

    def expires_at(self) -> datetime | None:
        """When the event goes stale (without skew tolerance), or None if it never does."""
        if self.ttl_ms is None:
            return None
        try:
            return self.issued_at + timedelta(milliseconds=self.ttl_ms)
        except OverflowError:  # past year 9999
            return None

    def to_wire(self) -> dict[str, Any]:
        """The JSON object to encode: every v1 field, timestamps as RFC 3339 UTC with ``Z``."""
        data = wire_fields(
            id=self.id,
            type=self.type,
            source=self.source,
            issued_at=format_timestamp(self.issued_at),
            trace_id=self.trace_id,
            causation_id=self.causation_id,
            correlation_id=self.correlation_id,
            dedup_key=self.dedup_key,
            ttl_ms=self.ttl_ms,
            payload=self.payload,
        )
        if self.model_extra:
            for key, value in self.model_extra.items():
                data.setdefault(key, value)
        return data

    def encode(self) -> bytes:
        """The body bytes to sign and publish."""
        return codec.dumps(self.to_wire())


def wire_fields(
    *,
    id: str,
    type: str,
    source: str,
    issued_at: str,
    trace_id: str,
    causation_id: str | None,
    correlation_id: str | None,
    dedup_key: str | None,
    ttl_ms: int | None,
    payload: dict[str, Any],
) -> dict[str, Any]:
    """The v1 fields as the JSON object on the wire, in their order (``issued_at`` already
    formatted). For an envelope choreo builds itself from checked parts, such as a handler's
    emitted event, this skips constructing an :class:`Envelope`, which costs more than the
    encoding."""
    return {
        "id": id,
        "type": type,
        "source": source,
        "issued_at": issued_at,
        "trace_id": trace_id,
        "causation_id": causation_id,
        "correlation_id": correlation_id,
        "dedup_key": dedup_key,
        "ttl_ms": ttl_ms,
        "payload": payload,
    }


# A second since the epoch and its RFC 3339 text, as one tuple: threads never mix two seconds.
_SECOND: list[tuple[int, str]] = [(-1, "")]


def now_timestamp() -> str:
    """``format_timestamp(datetime.now(UTC))``, a third of the cost: the text up to the
    second is kept for the current second."""
    # Integer nanoseconds, floored like datetime.now (a float's fraction can be 1 ms off).
    second, ns = divmod(time.time_ns(), 1_000_000_000)
    cached, text = _SECOND[0]
    if second != cached:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _SECOND[0] = (second, text)
    return "%s.%03dZ" % (text, ns // 1_000_000)  # noqa: UP031


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with millisecond precision, e.g. ``2026-11-20T10:00:00.123Z``."""
    # One %-format, and no conversion of a time already in UTC: this runs for every event
    # published (an f-string with seven format specs cost almost twice as much).
    m = moment if moment.tzinfo is UTC else moment.astimezone(UTC)
    return "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ" % (  # noqa: UP031
        m.year,
        m.month,
        m.day,
        m.hour,
        m.minute,
        m.second,
        m.microsecond // 1000,
    )


_VALIDATE_ENVELOPE = Envelope.__pydantic_validator__.validate_python


def parse_envelope(body: bytes) -> Envelope:
    """Decode and validate ``body``.

    Raises :class:`~choreo.errors.MalformedMessage` if it is not a UTF-8 JSON object and
    :class:`~choreo.errors.SchemaInvalid` if the object is not a v1 envelope.
    """
    data = codec.loads_object(body)
    try:  # model_validate without its Python-level argument handling
        envelope: Envelope = _VALIDATE_ENVELOPE(data)
    except ValidationError as exc:
        raise SchemaInvalid(f"envelope: {describe_validation_error(exc)}") from exc
    return envelope


def describe_validation_error(exc: ValidationError, limit: int = 3) -> str:
    """A short, single-line summary of a pydantic error, fit for a header."""
    parts = []
    for err in exc.errors(include_url=False)[:limit]:
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}")
    more = exc.error_count() - limit
    if more > 0:
        parts.append(f"(+{more} more)")
    return "; ".join(parts)
