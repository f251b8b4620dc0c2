"""The v1 envelope, event ids and typed events."""

from __future__ import annotations

import random
import re
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import Field

import choreo
from choreo import codec
from choreo.envelope import TYPE_PATTERN, Envelope, format_timestamp, now_timestamp, parse_envelope
from choreo.errors import ConfigError, MalformedMessage, SchemaInvalid
from choreo.events import EventRegistry
from choreo.ids import derived_id, new_trace_id, uuid7

TIMESTAMP_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def wire(**changes: Any) -> dict[str, Any]:
    """A minimal valid wire object, with ``changes`` applied (a value of ``...`` deletes the field)."""
    data: dict[str, Any] = {
        "id": "e-1",
        "type": "order.placed",
        "source": "shop",
        "issued_at": "2026-11-20T10:00:00.123Z",
        "trace_id": TRACE_ID,
        "payload": {"order_id": "o-1"},
    }
    for key, value in changes.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def body(**changes: Any) -> bytes:
    return codec.dumps(wire(**changes))


def full_envelope() -> Envelope:
    return Envelope.model_validate(
        {
            "id": uuid7(),
            "type": "payment.captured",
            "source": "billing",
            "issued_at": datetime(2026, 11, 20, 10, 0, 0, 123000, tzinfo=UTC),
            "trace_id": new_trace_id(),
            "causation_id": "cause-1",
            "correlation_id": "saga-1",
            "dedup_key": "payment-p-1",
            "ttl_ms": 30000,
            "payload": {"payment_id": "p-1", "amount": {"value": "12.50", "currency": "EUR"}, "tags": ["a"]},
        }
    )


# round trip ----------------------------------------------------------------------------------


def test_encode_parse_round_trip() -> None:
    original = full_envelope()
    encoded = original.encode()
    parsed = parse_envelope(encoded)
    assert parsed == original
    assert parsed.issued_at == original.issued_at
    assert parsed.payload == original.payload
    assert parsed.encode() == encoded


def test_encode_writes_every_v1_field_including_nulls() -> None:
    envelope = parse_envelope(body())
    data = codec.loads_object(envelope.encode())
    assert data == {
        "id": "e-1",
        "type": "order.placed",
        "source": "shop",
        "issued_at": "2026-11-20T10:00:00.123Z",
        "trace_id": TRACE_ID,
        "causation_id": None,
        "correlation_id": None,
        "dedup_key": None,
        "ttl_ms": None,
        "payload": {"order_id": "o-1"},
    }


def test_parse_minimal_body_of_the_wire_format_doc() -> None:
    raw = (
        b'{"id":"e-1","type":"order.placed","source":"shop","issued_at":"2026-11-20T10:00:00Z",'
        b'"trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","payload":{"order_id":"o-1"}}'
    )
    envelope = parse_envelope(raw)
    assert envelope.id == "e-1"
    assert envelope.issued_at == datetime(2026, 11, 20, 10, 0, tzinfo=UTC)
    assert envelope.causation_id is None
    assert envelope.ttl_ms is None
    assert envelope.expires_at() is None


def test_envelope_is_frozen() -> None:
    envelope = parse_envelope(body())
    with pytest.raises(ValueError, match="frozen"):
        envelope.id = "other"  # type: ignore[misc]


# timestamps ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("moment", "expected"),
    [
        (datetime(2026, 11, 20, 10, 0, 0, 123456, tzinfo=UTC), "2026-11-20T10:00:00.123Z"),
        (datetime(2026, 11, 20, 10, 0, 0, tzinfo=UTC), "2026-11-20T10:00:00.000Z"),
        (datetime(2026, 11, 20, 10, 0, 0, 999999, tzinfo=UTC), "2026-11-20T10:00:00.999Z"),
        (datetime(2026, 11, 20, 12, 0, 0, 5000, tzinfo=timezone(timedelta(hours=2))), "2026-11-20T10:00:00.005Z"),
        (datetime(2026, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=1))), "2025-12-31T23:30:00.000Z"),
        (datetime(5, 3, 4, 5, 6, 7, 8000, tzinfo=UTC), "0005-03-04T05:06:07.008Z"),
        (datetime(2026, 11, 20, 10, 0, 0, 1000, tzinfo=timezone(timedelta(0), "Z")), "2026-11-20T10:00:00.001Z"),
    ],
)
def test_format_timestamp_is_rfc3339_utc_with_z_and_milliseconds(moment: datetime, expected: str) -> None:
    text = format_timestamp(moment)
    assert text == expected
    assert TIMESTAMP_RE.match(text)


def test_now_timestamp_is_format_timestamp_of_now_across_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The text up to the second is kept per second; each call still has its own milliseconds,
    floored from integer nanoseconds as datetime.now does, and the next second (or an earlier
    one: the clock stepped back, even before 1970) gets its own text."""
    base = 1_795_000_000 * 10**9
    readings = [
        base + 400_000,
        base + 567_999_999,  # a float of this would read 568 ms
        base + 999_999_999,
        base + 10**9,
        base - 86_400 * 10**9 + 123_456_789,
        base + 10**9 + 250_000_001,
        -500_000_000,  # half a second before the epoch
    ]
    clock = iter(readings)
    monkeypatch.setattr("choreo.envelope.time.time_ns", lambda: next(clock))
    texts = [now_timestamp() for _ in readings]
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    assert texts == [format_timestamp(epoch + timedelta(microseconds=ns // 1000)) for ns in readings]
    assert texts[1].endswith(".567Z")
    assert texts[-1] == "1969-12-31T23:59:59.500Z"
    assert all(TIMESTAMP_RE.match(text) for text in texts)


def test_now_timestamp_is_now() -> None:
    now = datetime.now(UTC)
    before = now.replace(microsecond=now.microsecond // 1000 * 1000)  # the text has milliseconds
    text = now_timestamp()
    after = datetime.now(UTC)
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert before - timedelta(milliseconds=1) <= parsed <= after


def test_issued_at_is_encoded_as_utc_z_milliseconds() -> None:
    envelope = parse_envelope(body(issued_at="2026-11-20T12:00:00.5+02:00"))
    data = codec.loads_object(envelope.encode())
    assert data["issued_at"] == "2026-11-20T10:00:00.500Z"
    assert TIMESTAMP_RE.match(data["issued_at"])
    assert parse_envelope(envelope.encode()).issued_at == envelope.issued_at


def test_expires_at_adds_ttl_to_issued_at() -> None:
    envelope = parse_envelope(body(ttl_ms=1500))
    assert envelope.expires_at() == datetime(2026, 11, 20, 10, 0, 1, 623000, tzinfo=UTC)


# forward compatibility -----------------------------------------------------------------------


def test_unknown_top_level_fields_are_kept_and_reencoded() -> None:
    extras = {"x_schema_version": 3, "tenant": {"id": "t-1", "tier": ["gold"]}, "note": None}
    envelope = parse_envelope(body(**extras))
    assert envelope.model_extra == extras
    data = codec.loads_object(envelope.encode())
    for key, value in extras.items():
        assert data[key] == value
    again = parse_envelope(envelope.encode())
    assert again.model_extra == extras
    assert again == envelope


def test_extras_do_not_shadow_known_fields() -> None:
    envelope = parse_envelope(body(extra_field="x"))
    assert envelope.id == "e-1"
    assert codec.loads_object(envelope.encode())["id"] == "e-1"


# malformed and invalid -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"",
        b"{",
        b'{"id": "e-1",}',
        b"\xff{",
        b'{"id": "\xff"}',
        b"[]",
        b'[{"id": "e-1"}]',
        b'"order.placed"',
        b"42",
        b"null",
        b"true",
    ],
)
def test_malformed_bodies_raise_malformed_message(raw: bytes) -> None:
    with pytest.raises(MalformedMessage) as info:
        parse_envelope(raw)
    assert info.value.reason == "malformed"
    assert not isinstance(info.value, SchemaInvalid)


def test_malformed_message_names_what_was_wrong() -> None:
    with pytest.raises(MalformedMessage, match="JSON object, got list"):
        parse_envelope(b"[1, 2]")
    with pytest.raises(MalformedMessage, match="JSON object, got str"):
        parse_envelope(b'"x"')
    with pytest.raises(MalformedMessage, match="not valid UTF-8 JSON"):
        parse_envelope(b"\xff{")


@pytest.mark.parametrize("field", ["id", "type", "source", "issued_at", "trace_id", "payload"])
def test_missing_required_field_raises_schema_invalid(field: str) -> None:
    with pytest.raises(SchemaInvalid, match=field) as info:
        parse_envelope(body(**{field: ...}))
    assert info.value.reason == "schema"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", ""),
        ("id", "x" * 129),
        ("id", 5),
        ("id", None),
        ("type", "Order.Placed"),
        ("type", "order"),
        ("type", "order."),
        ("type", ".order"),
        ("type", "order..placed"),
        ("type", "1order.placed"),
        ("type", "order.1placed"),
        ("type", "order-placed.x"),
        ("type", "order.placed "),
        ("type", "order.placed\n"),
        ("type", "order.*"),
        ("source", ""),
        ("source", None),
        ("issued_at", "2026-11-20T10:00:00"),  # naive: no offset
        ("issued_at", "2026-11-20T10:00:00.123"),
        ("issued_at", "2026-11-20"),
        ("issued_at", "yesterday"),
        ("issued_at", None),
        ("trace_id", TRACE_ID.upper()),
        ("trace_id", TRACE_ID[:-1]),
        ("trace_id", TRACE_ID + "0"),
        ("trace_id", TRACE_ID[:-1] + "g"),
        ("trace_id", TRACE_ID + "\n"),
        ("trace_id", "00-" + TRACE_ID),
        ("ttl_ms", 0),
        ("ttl_ms", -1),
        ("ttl_ms", "100"),
        ("ttl_ms", 1.5),
        ("ttl_ms", 100.0),
        ("ttl_ms", True),
        ("payload", []),
        ("payload", "text"),
        ("payload", None),
        ("payload", 1),
        ("causation_id", 7),
        ("correlation_id", ["a"]),
        ("dedup_key", {"k": 1}),
    ],
)
def test_schema_violations_raise_schema_invalid(field: str, value: Any) -> None:
    with pytest.raises(SchemaInvalid, match=field) as info:
        parse_envelope(body(**{field: value}))
    assert not isinstance(info.value, MalformedMessage)
    assert str(info.value).startswith("envelope: ")


@pytest.mark.parametrize("value", [1763632800, "1763632800", 1763632800.5])
def test_issued_at_as_unix_timestamp_is_a_schema_violation(value: Any) -> None:
    with pytest.raises(SchemaInvalid, match="issued_at"):
        parse_envelope(body(issued_at=value))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", "x" * 128),
        ("id", "a"),
        ("type", "a.b"),
        ("type", "order_v2.placed_at.eu_west"),
        ("ttl_ms", 1),
        ("issued_at", "2026-11-20T10:00:00+00:00"),
        ("issued_at", "2026-11-20T10:00:00.123456Z"),
        ("payload", {}),
    ],
)
def test_boundary_values_are_valid(field: str, value: Any) -> None:
    envelope = parse_envelope(body(**{field: value}))
    assert envelope.model_dump()[field] is not None


def test_schema_error_message_is_short_and_single_line() -> None:
    raw = body(id=..., type="X", trace_id="nope", ttl_ms=0, payload=[])
    with pytest.raises(SchemaInvalid) as info:
        parse_envelope(raw)
    message = str(info.value)
    assert "\n" not in message
    assert "(+2 more)" in message


# effective values ----------------------------------------------------------------------------


def test_effective_dedup_key_defaults_to_id() -> None:
    assert parse_envelope(body()).effective_dedup_key == "e-1"
    assert parse_envelope(body(dedup_key=None)).effective_dedup_key == "e-1"
    assert parse_envelope(body(dedup_key="order-o-1")).effective_dedup_key == "order-o-1"


def test_effective_correlation_id_defaults_to_id() -> None:
    assert parse_envelope(body()).effective_correlation_id == "e-1"
    assert parse_envelope(body(correlation_id=None)).effective_correlation_id == "e-1"
    assert parse_envelope(body(correlation_id="saga-9")).effective_correlation_id == "saga-9"


def test_empty_string_dedup_key_is_kept_not_defaulted() -> None:
    """Only null means "use the id"; an empty string is a value."""
    envelope = parse_envelope(body(dedup_key="", correlation_id=""))
    assert envelope.effective_dedup_key == ""
    assert envelope.effective_correlation_id == ""


def test_type_pattern_constant_matches_the_wire_format_doc() -> None:
    assert TYPE_PATTERN == r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$"


# ids -----------------------------------------------------------------------------------------


def test_uuid7_format_version_and_variant() -> None:
    before_ms = time.time_ns() // 1_000_000
    values = [uuid7() for _ in range(200)]
    after_ms = time.time_ns() // 1_000_000
    assert len(set(values)) == len(values)
    for value in values:
        assert UUID_RE.match(value), value
        parsed = uuid.UUID(value)
        assert str(parsed) == value
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
        assert before_ms <= parsed.int >> 80 <= after_ms


def test_uuid7_is_a_valid_envelope_id() -> None:
    assert parse_envelope(body(id=uuid7())).id


def test_new_trace_id_is_w3c_format() -> None:
    values = {new_trace_id() for _ in range(100)}
    assert len(values) == 100
    for value in values:
        assert re.fullmatch(r"[0-9a-f]{32}", value)
        assert value != "0" * 32
        assert parse_envelope(body(trace_id=value)).trace_id == value


def test_derived_id_is_deterministic() -> None:
    first = derived_id("e-1", "billing", "payment.captured", 0)
    assert first == derived_id("e-1", "billing", "payment.captured", 0)
    parsed = uuid.UUID(first)
    assert str(parsed) == first
    assert parsed.version == 5


def test_derived_id_is_fixed_forever() -> None:
    """Ids depend on the namespace; changing it would break dedup across an upgrade."""
    namespace = uuid.UUID("6f1c3b1e-6d1a-4c8e-9a57-63686f72656f")
    expected = str(uuid.uuid5(namespace, "e-1\x1fbilling\x1fpayment.captured\x1f0"))
    assert derived_id("e-1", "billing", "payment.captured", 0) == expected


def test_derived_id_is_uuid5_for_any_input() -> None:
    """Built on bytes, not with uuid.uuid5: the two agree, non-ASCII names and every byte
    value of the version and variant positions included."""
    namespace = uuid.UUID("6f1c3b1e-6d1a-4c8e-9a57-63686f72656f")
    rng = random.Random(7)
    for n in range(5000):
        handled = str(uuid.UUID(int=rng.getrandbits(128))) if n % 2 else f"e-{n}-\u00e9\u4e2d\U0001f600"
        agent, event_type, ordinal = f"agent-{n % 7}", f"t.{n % 11}", n % 13
        expected = str(uuid.uuid5(namespace, f"{handled}\x1f{agent}\x1f{event_type}\x1f{ordinal}"))
        assert derived_id(handled, agent, event_type, ordinal) == expected


def test_derived_id_refuses_a_lone_surrogate_as_uuid5_does() -> None:
    with pytest.raises(UnicodeEncodeError):
        derived_id("e-\ud800", "billing", "payment.captured", 0)


@pytest.mark.parametrize(
    "other",
    [
        ("e-2", "billing", "payment.captured", 0),
        ("e-1", "shipping", "payment.captured", 0),
        ("e-1", "billing", "payment.failed", 0),
        ("e-1", "billing", "payment.captured", 1),
    ],
)
def test_derived_id_differs_when_any_input_differs(other: tuple[str, str, str, int]) -> None:
    assert derived_id("e-1", "billing", "payment.captured", 0) != derived_id(*other)


def test_derived_id_does_not_merely_concatenate() -> None:
    assert derived_id("e-1", "ab", "x.y", 0) != derived_id("e-1a", "b", "x.y", 0)
    assert derived_id("e-1", "billing", "x.y", 1) != derived_id("e-1", "billing", "x.y", 10)


# typed events --------------------------------------------------------------------------------


class OrderPlaced(choreo.Event, type="order.placed"):
    order_id: str
    quantity: int = 1


class QuoteIssued(choreo.Event, type="quote.issued", ttl_ms=5000):
    quote_id: str


def test_event_subclass_binds_its_type() -> None:
    assert OrderPlaced.event_type() == "order.placed"
    assert OrderPlaced.__event_ttl_ms__ is None
    assert QuoteIssued.event_type() == "quote.issued"
    assert QuoteIssued.__event_ttl_ms__ == 5000


def test_event_subclass_without_keyword_inherits_type() -> None:
    class BigOrderPlaced(OrderPlaced):
        pass

    assert BigOrderPlaced.event_type() == "order.placed"


def test_event_base_without_type_has_no_event_type() -> None:
    class Base(choreo.Event):
        tenant: str

    with pytest.raises(ConfigError, match="declares no event type"):
        Base.event_type()

    class Concrete(Base, type="tenant.created"):
        pass

    assert Concrete.event_type() == "tenant.created"


def test_events_are_frozen() -> None:
    event = OrderPlaced(order_id="o-1")
    with pytest.raises(ValueError, match="frozen"):
        event.order_id = "o-2"  # type: ignore[misc]


@pytest.mark.parametrize(
    "name",
    ["Order.Placed", "order", "order.", "order..placed", "1order.placed", "order-placed.x", "", "order.placed "],
)
def test_invalid_event_type_name_raises_config_error(name: str) -> None:
    with pytest.raises(ConfigError, match="must match"):

        class Bad(choreo.Event, type=name):
            pass


def test_event_type_with_trailing_newline_raises_config_error() -> None:
    with pytest.raises(ConfigError):

        class Bad(choreo.Event, type="order.placed\n"):
            pass


@pytest.mark.parametrize("ttl_ms", [0, -5])
def test_invalid_event_ttl_raises_config_error(ttl_ms: int) -> None:
    with pytest.raises(ConfigError, match="ttl_ms"):

        class Bad(choreo.Event, type="order.expiring", ttl_ms=ttl_ms):
            pass


class Shipped(choreo.Event, type="order.shipped"):
    order_id: str
    at: datetime
    items: list[dict[str, int]]
    note: str | None = Field(default=None, alias="remark")
    weight: float = 1.5


class Customised(choreo.Event, type="order.customised"):
    order_id: str

    def model_dump(self, **kwargs: Any) -> dict[str, Any]:
        return {"order_id": self.order_id.upper()}


def test_to_payload_is_model_dump_in_json_mode() -> None:
    event = Shipped(order_id="o-1", at=datetime(2026, 11, 20, 10, 0, tzinfo=UTC), items=[{"a": 1}], remark="x")
    assert event.to_payload() == event.model_dump(mode="json")
    assert event.to_payload() == {
        "order_id": "o-1",
        "at": "2026-11-20T10:00:00Z",
        "items": [{"a": 1}],
        "note": "x",
        "weight": 1.5,
    }


def test_to_payload_honours_a_class_that_overrides_model_dump() -> None:
    assert Customised(order_id="o-1").to_payload() == {"order_id": "O-1"}


class Normalised(choreo.Event, type="order.normalised"):
    order_id: str

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Normalised:
        return super().model_validate({**obj, "order_id": str(obj["order_id"]).strip()}, **kwargs)


class StaticallyValidated(choreo.Event, type="order.static"):
    order_id: str

    @staticmethod
    def model_validate(obj: Any, **kwargs: Any) -> StaticallyValidated:  # type: ignore[override]
        return StaticallyValidated(order_id=str(obj["order_id"]).upper())


def test_from_payload_honours_a_staticmethod_override_of_model_validate() -> None:
    assert StaticallyValidated.from_payload({"order_id": "o-1"}).order_id == "O-1"


def test_from_payload_honours_a_class_that_overrides_model_validate() -> None:
    assert Normalised.from_payload({"order_id": "  o-1 "}).order_id == "o-1"


def test_from_payload_builds_an_instance() -> None:
    event = OrderPlaced.from_payload({"order_id": "o-1", "quantity": 3})
    assert isinstance(event, OrderPlaced)
    assert event.order_id == "o-1"
    assert event.quantity == 3


def test_from_payload_missing_field_raises_schema_invalid_naming_it() -> None:
    with pytest.raises(SchemaInvalid, match="order_id") as info:
        OrderPlaced.from_payload({"quantity": 3})
    assert "order.placed" in str(info.value)
    assert info.value.reason == "schema"


def test_from_payload_wrong_type_raises_schema_invalid_naming_the_field() -> None:
    with pytest.raises(SchemaInvalid, match="quantity"):
        OrderPlaced.from_payload({"order_id": "o-1", "quantity": "many"})


def test_event_registry_refuses_two_classes_for_one_type() -> None:
    class Other(choreo.Event, type="order.placed"):
        x: int

    registry = EventRegistry()
    registry.add(OrderPlaced)
    registry.add(OrderPlaced)
    assert len(registry) == 1
    assert registry.get("order.placed") is OrderPlaced
    assert registry.get("order.unknown") is None
    with pytest.raises(ConfigError, match="bound to both"):
        registry.add(Other)
    registry.add(QuoteIssued)
    assert set(registry) == {OrderPlaced, QuoteIssued}
