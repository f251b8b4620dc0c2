"""Publishing: from envelope to signed AMQP message, and the Publisher for existing services.

async with choreo.Publisher(source="shop") as p:
    await p.publish(OrderPlaced(order_id="o-1", ...))   # returns once the broker confirmed
"""

from __future__ import annotations

from collections.abc import Awaitable
from datetime import UTC, datetime
from random import getrandbits as _getrandbits
from types import TracebackType
from typing import Any, Self, cast

from .config import Settings
from .envelope import Envelope
from .events import Event
from .ids import new_trace_id, uuid7
from .observability import tracing as otel
from .signing import Keyring
from .transport.base import HeaderValue, OutgoingMessage, Transport

__all__ = ["Publisher", "new_envelope", "publish_traced", "signed_message", "to_message"]


def traceparent(trace_id: str) -> str:
    """W3C traceparent for a fresh span in ``trace_id``: a random, never all-zero parent id."""
    # A span id needs to be unique, not secret (OpenTelemetry's SDK draws it the same way);
    # os.urandom would be a system call per message. random reseeds itself in a forked child.
    return f"00-{trace_id}-{(_getrandbits(64) or 1).to_bytes(8).hex()}-01"


def _property(value: str | None) -> str | None:
    """``value`` as an AMQP short-string property, or None past its 255 bytes: the property is
    only a hint for tools (the body is authoritative), and an id of 128 four-byte characters is
    valid in the body but would make the message unsendable."""
    return value if value is None or len(value) <= 63 or len(value.encode()) <= 255 else None


def to_message(
    envelope: Envelope, keyring: Keyring, exchange: str, *, expiration_slack_ms: int = 0, body: bytes | None = None
) -> OutgoingMessage:
    """The signed, persistent message for ``envelope``, routed by its type.

    The AMQP ``expiration`` is ``ttl_ms`` plus ``expiration_slack_ms`` (the consumers' clock-skew
    tolerance): a backstop so stale events nobody consumes do not pile up. Consumers decide
    staleness themselves first and dead-letter it as ``expired`` with the fault headers; what the
    broker expires reaches the DLQ too, with RabbitMQ's ``x-death`` header.
    """
    return signed_message(
        envelope.encode() if body is None else body,  # ``body``: bytes already encoded (outbox)
        keyring,
        exchange,
        event_type=envelope.type,
        event_id=envelope.id,
        correlation_id=envelope.effective_correlation_id,
        trace_id=envelope.trace_id,
        ttl_ms=envelope.ttl_ms,
        expiration_slack_ms=expiration_slack_ms,
    )


def signed_message(
    body: bytes,
    keyring: Keyring,
    exchange: str,
    *,
    event_type: str,
    event_id: str,
    correlation_id: str,
    trace_id: str,
    ttl_ms: int | None,
    expiration_slack_ms: int = 0,
) -> OutgoingMessage:
    """:func:`to_message` for an envelope already encoded as ``body``, given the fields the
    message's properties repeat (``correlation_id``: the effective one)."""
    headers = cast(dict[str, HeaderValue], keyring.sign(body))  # a fresh dict each time
    headers["traceparent"] = traceparent(trace_id)
    # Positionally, in OutgoingMessage's field order: keywords cost 3.5k instructions a message.
    return OutgoingMessage(
        exchange,
        event_type,  # the routing key
        body,
        headers,
        event_id if len(event_id) <= 63 else _property(event_id),  # message_id
        correlation_id if len(correlation_id) <= 63 else _property(correlation_id),
        event_type,  # type
        ttl_ms + expiration_slack_ms if ttl_ms is not None else None,  # expiration_ms
    )


def new_envelope(
    event_type: str,
    payload: dict[str, Any],
    *,
    source: str,
    id: str | None = None,
    trace_id: str | None = None,
    causation_id: str | None = None,
    correlation_id: str | None = None,
    dedup_key: str | None = None,
    ttl_ms: int | None = None,
    issued_at: datetime | None = None,
) -> Envelope:
    """A validated root (or explicitly caused) envelope with fresh id and trace id by default."""
    return Envelope(
        id=id or uuid7(),
        type=event_type,
        source=source,
        issued_at=issued_at or datetime.now(UTC),
        trace_id=trace_id or new_trace_id(),
        causation_id=causation_id,
        correlation_id=correlation_id,
        dedup_key=dedup_key,
        ttl_ms=ttl_ms,
        payload=payload,
    )


def publish_traced(
    transport: Transport, message: OutgoingMessage, *, trace_id: str, tracing: otel.Tracing | None
) -> Awaitable[None]:
    """Publish ``message``; the awaitable resolves once the broker confirmed. Inside a PRODUCER
    span when ``tracing`` is on: the span's context replaces the message's plain
    ``traceparent``, so consumers hang off it, and the span ends once the broker confirmed, or
    with the error if the publish failed.

    Without tracing, the transport's own awaitable: no coroutine of ours to resume per publish."""
    if tracing is None:
        return transport.publish(message)
    return _publish_in_span(transport, message, trace_id, tracing)


async def _publish_in_span(
    transport: Transport, message: OutgoingMessage, trace_id: str, tracing: otel.Tracing
) -> None:
    span = tracing.publish(message.headers, message.routing_key, message.message_id, trace_id=trace_id)
    try:
        await transport.publish(message)
    except BaseException as exc:
        otel.Tracing.end(span, exc)
        raise
    otel.Tracing.end(span)


class Publisher:
    """Signs and publishes events; :meth:`publish` returns once the broker confirmed.

    Give it a ``transport`` to share a connection (it is then not closed on exit), or let it
    open a RabbitMQ connection to ``url`` / ``CHOREO_AMQP_URL``.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        source: str = "choreo",
        keyring: Keyring | None = None,
        exchange: str | None = None,
        transport: Transport | None = None,
        settings: Settings | None = None,
    ) -> None:
        self.settings = settings or Settings.from_env()
        self.source = source
        self.keyring = keyring or self.settings.keyring
        self.exchange = exchange or self.settings.naming.exchange
        self._owns_transport = transport is None
        if transport is None:
            from .transport.rabbitmq import RabbitMQTransport

            transport = RabbitMQTransport(url or self.settings.amqp_url, connection_name=f"choreo-publisher:{source}")
        self.transport = transport
        # Looked up once: OpenTelemetry reads the environment on every provider lookup.
        self._tracing = otel.current()

    async def __aenter__(self) -> Self:
        if self._owns_transport:
            await self.transport.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._owns_transport:
            await self.transport.close()

    async def publish(
        self,
        event: Event,
        *,
        id: str | None = None,
        trace_id: str | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        dedup_key: str | None = None,
        ttl_ms: int | None = None,
    ) -> Envelope:
        """Publish a typed event; returns the envelope that was sent (its ``id`` included).

        With tracing on and no ``trace_id`` given, the event joins the caller's current trace."""
        if trace_id is None and self._tracing is not None:
            trace_id = self._tracing.current_trace_id()
        envelope = new_envelope(
            event.event_type(),
            event.to_payload(),
            source=self.source,
            id=id,
            trace_id=trace_id,
            causation_id=causation_id,
            correlation_id=correlation_id,
            dedup_key=dedup_key,
            ttl_ms=ttl_ms if ttl_ms is not None else type(event).__event_ttl_ms__,
        )
        await self._send(envelope)
        return envelope

    async def publish_envelope(self, envelope: Envelope) -> None:
        """Sign and publish an envelope built already; returns once the broker confirmed."""
        await self._send(envelope)

    def _send(self, envelope: Envelope) -> Awaitable[None]:
        message = to_message(envelope, self.keyring, self.exchange, expiration_slack_ms=self.settings.clock_skew_ms)
        return publish_traced(self.transport, message, trace_id=envelope.trace_id, tracing=self._tracing)
