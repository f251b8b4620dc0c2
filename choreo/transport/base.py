"""The transport seam: the few broker operations the runtime needs.

Every transport passes the same contract suite (``tests/contract``). Contracts:

- :meth:`Transport.publish` returns only once the broker has taken responsibility for the
  message (publisher confirm); otherwise it raises :class:`~choreo.errors.PublishNotConfirmed`.
- A :class:`Delivery` is settled exactly once: ``ack`` removes it; ``nack(requeue=True)``
  returns it to its queue (counting a delivery); a delivery never settled is returned to its
  queue when its consumer's connection goes away.
- Deliveries of one subscription run concurrently, at most ``prefetch`` unsettled at a time.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, Self

from ..topology import QueueSpec, QueueState, Topology

__all__ = [
    "RAW_PROPERTIES",
    "UNDECODABLE_PROPERTIES",
    "Delivery",
    "DeliveryHandler",
    "OutgoingMessage",
    "Subscription",
    "Transport",
]

HeaderValue = str | int | float | bool | bytes | None

# A delivery whose broker properties (headers included) could not be decoded still reaches the
# runtime, which dead-letters it as ``malformed``: its headers are then only these two, the
# decoder's complaint and the raw property bytes, so the DLQ keeps what was sent.
UNDECODABLE_PROPERTIES = "x-choreo-undecodable-properties"
RAW_PROPERTIES = "x-choreo-raw-properties"


@dataclass(slots=True)
class OutgoingMessage:
    exchange: str
    routing_key: str
    body: bytes
    headers: dict[str, HeaderValue] = field(default_factory=dict)
    message_id: str | None = None
    correlation_id: str | None = None
    type: str | None = None
    expiration_ms: int | None = None
    # Mandatory publishes fail when nothing is bound to receive them (used for queue moves).
    mandatory: bool = False


class Delivery(Protocol):
    @property
    def body(self) -> bytes: ...
    @property
    def headers(self) -> Mapping[str, object]: ...
    @property
    def routing_key(self) -> str: ...
    @property
    def exchange(self) -> str: ...
    @property
    def message_id(self) -> str | None: ...
    @property
    def redelivered(self) -> bool: ...
    @property
    def correlation_id(self) -> str | None: ...
    @property
    def type(self) -> str | None: ...

    def ack(self) -> Awaitable[None]:
        """Acknowledge; resolves once the ack is on its way (TransportError if the channel is
        gone: the broker then redelivers). May be a future rather than a coroutine."""
        ...

    async def nack(self, *, requeue: bool) -> None: ...


DeliveryHandler = Callable[[Delivery], Coroutine[Any, Any, None]]


class Subscription(Protocol):
    @property
    def queue(self) -> str: ...
    async def is_attached(self) -> bool:
        """True while the broker delivers to this subscription (checked on the live channel)."""
        ...

    async def cancel(self) -> None:
        """Stop receiving new deliveries; deliveries already handed out stay valid."""
        ...

    async def close(self) -> None:
        """Cancel, send the acks already asked for, then hand every delivery of this
        subscription still unsettled back to its queue, as closing the connection would (the
        connection itself stays open). Settling one of those afterwards raises TransportError."""
        ...


class Transport(abc.ABC):
    """A broker connection. Use as an async context manager."""

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @abc.abstractmethod
    async def connect(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def declare(self, topology: Topology) -> None:
        """Create what ``topology`` describes; idempotent. A conflicting existing queue raises
        :class:`~choreo.errors.TopologyError` naming the differing arguments."""

    @abc.abstractmethod
    async def publish(self, message: OutgoingMessage) -> None:
        """Publish and wait for the broker's confirm."""

    async def publish_many(self, messages: Sequence[OutgoingMessage]) -> None:
        """Publish all and return once every one is confirmed (pipelined where possible)."""
        for message in messages:
            await self.publish(message)

    @abc.abstractmethod
    async def subscribe(self, queue: str, handler: DeliveryHandler, *, prefetch: int) -> Subscription: ...

    @abc.abstractmethod
    async def inspect_queue(self, spec: QueueSpec) -> QueueState:
        """Compare ``spec`` with the broker's queue of that name, creating nothing."""

    @abc.abstractmethod
    async def queue_depth(self, queue: str) -> int:
        """Messages ready in ``queue`` (not counting unacked ones)."""

    @abc.abstractmethod
    async def get(self, queue: str) -> Delivery | None:
        """Fetch one message without a subscription (basic.get), or None if the queue is empty."""

    @abc.abstractmethod
    async def delete_queue(self, queue: str) -> None: ...

    @abc.abstractmethod
    async def delete_exchange(self, exchange: str) -> None: ...

    @property
    @abc.abstractmethod
    def connected(self) -> bool: ...
