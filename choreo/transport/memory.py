"""An in-process broker with RabbitMQ's semantics, for unit tests and the demo's fallback.

Modelled: topic exchanges (``*`` one word, ``#`` zero or more), the default exchange
(routing key = queue name), prefetch, ack / nack with requeue, redelivery flags, queue
arguments ``x-delivery-limit``, ``x-dead-letter-exchange``, ``x-dead-letter-routing-key``,
``x-message-ttl``, per-message expiration, ``x-death`` headers, mandatory publishes, and
unsettled deliveries returning to their queue when their connection closes.
Not modelled: persistence, flow control.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from ..errors import PublishNotConfirmed, TopologyError, TransportError
from ..topology import QueueSpec, QueueState, Topology
from .base import Delivery, DeliveryHandler, HeaderValue, OutgoingMessage, Subscription, Transport

__all__ = ["InMemoryBroker", "InMemoryTransport", "topic_matches"]


def _match_words(pattern: tuple[str, ...], key: tuple[str, ...]) -> bool:
    if not pattern:
        return not key
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match_words(rest, key[i:]) for i in range(len(key) + 1))
    return bool(key) and (head in ("*", key[0])) and _match_words(rest, key[1:])


@lru_cache(maxsize=65536)
def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: ``*`` is exactly one word, ``#`` zero or more words."""
    return _match_words(tuple(pattern.split(".")), tuple(routing_key.split(".")))


@dataclass(slots=True)
class _Message:
    exchange: str
    routing_key: str
    body: bytes
    headers: dict[str, HeaderValue | list[object]]
    message_id: str | None
    correlation_id: str | None
    type: str | None
    expires_at: float | None = None  # monotonic deadline from per-message expiration
    ttl_deadline: float | None = None  # monotonic deadline from the queue's x-message-ttl
    delivery_count: int = 0
    redelivered: bool = False


@dataclass(eq=False, slots=True)
class _Consumer:
    queue: _Queue
    handler: DeliveryHandler
    prefetch: int
    connection: InMemoryTransport
    in_flight: set[_Delivery] = field(default_factory=set)
    active: bool = True


@dataclass(eq=False, slots=True)
class _Queue:
    name: str
    arguments: dict[str, object]
    ready: deque[_Message] = field(default_factory=deque)
    consumers: list[_Consumer] = field(default_factory=list)
    rr: int = 0
    ttl_handle: asyncio.TimerHandle | None = None


class _Delivery:
    __slots__ = ("_broker", "_consumer", "_msg", "_redelivered", "settled")

    def __init__(self, broker: InMemoryBroker, consumer: _Consumer, msg: _Message) -> None:
        self._broker = broker
        self._consumer = consumer
        self._msg = msg
        self._redelivered = msg.redelivered  # fixed at delivery, as the AMQP flag is
        self.settled = False

    @property
    def body(self) -> bytes:
        return self._msg.body

    @property
    def headers(self) -> Mapping[str, object]:
        return self._msg.headers

    @property
    def routing_key(self) -> str:
        return self._msg.routing_key

    @property
    def exchange(self) -> str:
        return self._msg.exchange

    @property
    def message_id(self) -> str | None:
        return self._msg.message_id

    @property
    def redelivered(self) -> bool:
        return self._redelivered

    @property
    def correlation_id(self) -> str | None:
        return self._msg.correlation_id

    @property
    def type(self) -> str | None:
        return self._msg.type

    def _settle(self) -> None:
        if self.settled:
            raise TransportError("delivery already settled")
        if not self._consumer.connection.connected:
            raise TransportError("channel closed: the delivery returned to its queue")
        self.settled = True
        self._consumer.in_flight.discard(self)

    async def ack(self) -> None:
        self._settle()
        self._broker._pump(self._consumer.queue)

    async def nack(self, *, requeue: bool) -> None:
        self._settle()
        self._broker._return(self._consumer.queue, self._msg, requeue=requeue)


class _GetDelivery(_Delivery):
    """A basic.get delivery: not tied to a subscription's prefetch."""


class InMemoryBroker:
    """The shared broker state. Several :class:`InMemoryTransport` connections may use one."""

    def __init__(self) -> None:
        self.exchanges: dict[str, str] = {"": "direct"}
        self.bindings: dict[str, list[tuple[str, str]]] = {}  # exchange -> [(pattern, queue)]
        self.queues: dict[str, _Queue] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._connections: set[InMemoryTransport] = set()

    def transport(self) -> InMemoryTransport:
        return InMemoryTransport(self)

    # declaration -----------------------------------------------------------------------------
    def declare_exchange(self, name: str, kind: str = "topic") -> None:
        existing = self.exchanges.get(name)
        if existing is not None and existing != kind:
            raise TopologyError(
                f"exchange {name!r} exists as {existing}, declared as {kind}",
                entity=name,
                differences={"type": (kind, existing)},
            )
        self.exchanges[name] = kind

    def declare_queue(self, name: str, arguments: Mapping[str, object]) -> None:
        queue = self.queues.get(name)
        if queue is None:
            self.queues[name] = _Queue(name, dict(arguments))
            return
        diffs = {
            key: (arguments.get(key), queue.arguments.get(key))
            for key in set(arguments) | set(queue.arguments)
            if arguments.get(key) != queue.arguments.get(key)
        }
        if diffs:
            detail = ", ".join(f"{k}: declared {d!r}, existing {e!r}" for k, (d, e) in sorted(diffs.items()))
            raise TopologyError(
                f"queue {name!r} exists with other arguments ({detail})", entity=name, differences=diffs
            )

    def bind(self, queue: str, exchange: str, pattern: str) -> None:
        entry = (pattern, queue)
        bound = self.bindings.setdefault(exchange, [])
        if entry not in bound:
            bound.append(entry)

    # routing ---------------------------------------------------------------------------------
    def route(self, exchange: str, routing_key: str) -> list[_Queue]:
        if exchange == "":
            queue = self.queues.get(routing_key)
            return [queue] if queue is not None else []
        if exchange not in self.exchanges:
            raise PublishNotConfirmed(f"no exchange {exchange!r}")
        names = {q for pattern, q in self.bindings.get(exchange, []) if topic_matches(pattern, routing_key)}
        return [self.queues[n] for n in sorted(names) if n in self.queues]

    def publish(self, message: OutgoingMessage) -> None:
        targets = self.route(message.exchange, message.routing_key)
        if not targets and message.mandatory:
            raise PublishNotConfirmed(f"unroutable: exchange {message.exchange!r}, routing key {message.routing_key!r}")
        expires_at = None
        if message.expiration_ms is not None:
            expires_at = time.monotonic() + message.expiration_ms / 1000
        for queue in targets:
            self._enqueue(
                queue,
                _Message(
                    exchange=message.exchange,
                    routing_key=message.routing_key,
                    body=message.body,
                    headers=dict(message.headers),
                    message_id=message.message_id,
                    correlation_id=message.correlation_id,
                    type=message.type,
                    expires_at=expires_at,
                ),
            )

    def _enqueue(self, queue: _Queue, msg: _Message, *, front: bool = False) -> None:
        if front:
            queue.ready.appendleft(msg)  # a requeued message keeps its TTL deadline, as in RabbitMQ
        else:
            ttl = queue.arguments.get("x-message-ttl")
            if isinstance(ttl, int):
                msg.ttl_deadline = time.monotonic() + ttl / 1000
            queue.ready.append(msg)
        if msg.ttl_deadline is not None:
            self._arm_ttl(queue)
        self._pump(queue)

    def _arm_ttl(self, queue: _Queue) -> None:
        """Schedule expiry of the head message; messages expire at the head, as in RabbitMQ."""
        if queue.ttl_handle is not None:
            queue.ttl_handle.cancel()
            queue.ttl_handle = None
        if queue.ready and queue.ready[0].ttl_deadline is not None:
            delay = max(0.0, queue.ready[0].ttl_deadline - time.monotonic())
            queue.ttl_handle = asyncio.get_running_loop().call_later(delay, self._expire_head, queue)

    def _expire_head(self, queue: _Queue) -> None:
        queue.ttl_handle = None
        now = time.monotonic()
        while queue.ready and (deadline := queue.ready[0].ttl_deadline) is not None and deadline <= now:
            self._dead_letter(queue, queue.ready.popleft(), "expired")
        self._arm_ttl(queue)

    def _pop_live(self, queue: _Queue) -> _Message | None:
        """The head message, dead-lettering the ones whose per-message expiration passed."""
        now = time.monotonic()
        while queue.ready:
            msg = queue.ready.popleft()
            if msg.expires_at is not None and msg.expires_at <= now:
                self._dead_letter(queue, msg, "expired")
                continue
            return msg
        return None

    def _dead_letter(self, queue: _Queue, msg: _Message, reason: str) -> None:
        dlx = queue.arguments.get("x-dead-letter-exchange")
        if not isinstance(dlx, str):
            return  # no dead-letter target: the broker drops it, as RabbitMQ does
        dlrk = queue.arguments.get("x-dead-letter-routing-key")
        routing_key = dlrk if isinstance(dlrk, str) else msg.routing_key
        deaths = msg.headers.get("x-death")
        death_list: list[object] = list(deaths) if isinstance(deaths, list) else []
        death_list.insert(
            0,
            {
                "queue": queue.name,
                "reason": reason,
                "count": 1,
                "exchange": msg.exchange,
                "routing-keys": [msg.routing_key],
            },
        )
        headers = dict(msg.headers)
        headers["x-death"] = death_list
        for target in self.route(dlx, routing_key):
            self._enqueue(
                target,
                _Message(
                    exchange=dlx,
                    routing_key=routing_key,
                    body=msg.body,
                    headers=headers,
                    message_id=msg.message_id,
                    correlation_id=msg.correlation_id,
                    type=msg.type,
                ),
            )

    def _return(self, queue: _Queue, msg: _Message, *, requeue: bool) -> None:
        if not requeue:
            self._dead_letter(queue, msg, "rejected")
            self._pump(queue)
            return
        msg.delivery_count += 1
        msg.redelivered = True
        msg.headers["x-delivery-count"] = msg.delivery_count  # as quorum queues report it
        limit = queue.arguments.get("x-delivery-limit")
        if isinstance(limit, int) and msg.delivery_count > limit:
            self._dead_letter(queue, msg, "delivery_limit")
            self._pump(queue)
            return
        self._enqueue(queue, msg, front=True)

    # delivery --------------------------------------------------------------------------------
    def _pump(self, queue: _Queue) -> None:
        while queue.ready:
            consumer = self._next_consumer(queue)
            if consumer is None:
                return
            msg = self._pop_live(queue)
            if msg is None:
                return
            delivery = _Delivery(self, consumer, msg)
            consumer.in_flight.add(delivery)
            task = asyncio.get_running_loop().create_task(consumer.handler(delivery))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _next_consumer(self, queue: _Queue) -> _Consumer | None:
        n = len(queue.consumers)
        for offset in range(n):
            consumer = queue.consumers[(queue.rr + offset) % n]
            if consumer.active and len(consumer.in_flight) < consumer.prefetch:
                queue.rr = (queue.rr + offset + 1) % n
                return consumer
        return None

    def get(self, connection: InMemoryTransport, name: str) -> Delivery | None:
        queue = self._queue(name)
        msg = self._pop_live(queue)
        if msg is None:
            return None
        consumer = _Consumer(queue, _noop_handler, prefetch=1, connection=connection)
        delivery = _GetDelivery(self, consumer, msg)
        connection._gets.add(delivery)
        return delivery

    def _queue(self, name: str) -> _Queue:
        try:
            return self.queues[name]
        except KeyError:
            raise TransportError(f"NOT_FOUND - no queue {name!r}") from None

    def return_unsettled(self, consumer: _Consumer) -> None:
        """Detach ``consumer`` and put its unsettled deliveries back in their queue."""
        queue = consumer.queue
        if consumer in queue.consumers:
            queue.consumers.remove(consumer)
        consumer.active = False
        alive = self.queues.get(queue.name) is queue  # a deleted queue's messages went with it
        for delivery in list(consumer.in_flight):
            delivery.settled = True
            if alive:
                self._return(queue, delivery._msg, requeue=True)
        consumer.in_flight.clear()
        if consumer in consumer.connection._consumers:
            consumer.connection._consumers.remove(consumer)

    def close_connection(self, connection: InMemoryTransport) -> None:
        """Return every unsettled delivery of ``connection`` to its queue, as the broker does."""
        consumers, connection._consumers = connection._consumers, []
        for consumer in consumers:
            self.return_unsettled(consumer)
        for delivery in list(connection._gets):
            if not delivery.settled:
                delivery.settled = True
                self._return(delivery._consumer.queue, delivery._msg, requeue=True)
        connection._gets.clear()

    async def drain(self) -> None:
        """Wait until no handler task launched by this broker is running (tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


async def _noop_handler(_: Delivery) -> None:  # pragma: no cover - never called
    return None


class _MemorySubscription:
    def __init__(self, broker: InMemoryBroker, consumer: _Consumer) -> None:
        self._broker = broker
        self._consumer = consumer

    @property
    def queue(self) -> str:
        return self._consumer.queue.name

    async def is_attached(self) -> bool:
        return self._consumer.active and self._consumer.connection.connected

    async def cancel(self) -> None:
        self._consumer.active = False
        queue = self._consumer.queue
        if self._consumer in queue.consumers:
            queue.consumers.remove(self._consumer)

    async def close(self) -> None:
        await self.cancel()
        self._broker.return_unsettled(self._consumer)


class InMemoryTransport(Transport):
    """One connection to an :class:`InMemoryBroker`."""

    def __init__(self, broker: InMemoryBroker | None = None) -> None:
        self.broker = broker or InMemoryBroker()
        self._connected = False
        self._gets: set[_Delivery] = set()
        # Every consumer opened on this connection, cancelled ones included: a cancel stops new
        # deliveries, and those already handed out stay unacked until the connection goes.
        self._consumers: list[_Consumer] = []

    @property
    def connected(self) -> bool:
        return self._connected

    async def connect(self) -> None:
        self._connected = True

    async def close(self) -> None:
        if self._connected:
            self._connected = False
            self.broker.close_connection(self)

    def _check(self) -> None:
        if not self._connected:
            raise TransportError("in-memory transport is not connected")

    async def declare(self, topology: Topology) -> None:
        self._check()
        self.broker.declare_exchange(topology.exchange, "topic")
        for spec in topology.queues:
            self.broker.declare_queue(spec.name, spec.arguments)
            for key in spec.bindings:
                self.broker.bind(spec.name, topology.exchange, key)

    async def publish(self, message: OutgoingMessage) -> None:
        self._check()
        self.broker.publish(message)

    async def subscribe(self, queue: str, handler: DeliveryHandler, *, prefetch: int) -> Subscription:
        self._check()
        target = self.broker._queue(queue)
        consumer = _Consumer(target, handler, max(1, prefetch), self)
        target.consumers.append(consumer)
        self._consumers.append(consumer)
        self.broker._pump(target)
        return _MemorySubscription(self.broker, consumer)

    async def inspect_queue(self, spec: QueueSpec) -> QueueState:
        self._check()
        queue = self.broker.queues.get(spec.name)
        if queue is None:
            return QueueState(spec.name, exists=False)
        drift = {
            key: (spec.arguments.get(key), queue.arguments.get(key))
            for key in set(spec.arguments) | set(queue.arguments)
            if spec.arguments.get(key) != queue.arguments.get(key)
        }
        active = [c for c in queue.consumers if c.active]
        return QueueState(spec.name, True, len(queue.ready), len(active), drift)

    async def queue_depth(self, queue: str) -> int:
        self._check()
        return len(self.broker._queue(queue).ready)

    async def get(self, queue: str) -> Delivery | None:
        self._check()
        return self.broker.get(self, queue)

    async def delete_queue(self, queue: str) -> None:
        self._check()
        self.broker.queues.pop(queue, None)
        for bound in self.broker.bindings.values():
            bound[:] = [b for b in bound if b[1] != queue]

    async def delete_exchange(self, exchange: str) -> None:
        self._check()
        self.broker.exchanges.pop(exchange, None)
        self.broker.bindings.pop(exchange, None)
