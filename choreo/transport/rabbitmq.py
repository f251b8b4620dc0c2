"""RabbitMQ transport on aio-pika. The only module that imports aio-pika.

- One robust connection; aio-pika re-opens channels after a reconnect or a channel error.
  Consumers are registered on the aiormq channel underneath (aio-pika's per-message wrapper
  and second task cost more than the rest of a delivery), and restored by the subscription
  itself after a re-open or a broker-side consumer cancel.
- Several comma-separated URLs (the nodes of one cluster): connecting tries them in order;
  after a lost connection or a failed attempt, the next reconnect goes to the next URL.
- Publishing goes through one channel with publisher confirms; ``publish`` returns only
  after the broker's ack. Mandatory publishes (queue moves) raise when unroutable. Messages
  go straight to the aiormq channel with prebuilt properties (aio-pika's ``Message`` wrapper
  costs more than the rest of a publish).
- Acks are batched per channel: the acks requested in one event-loop turn go out as one
  ``basic.ack multiple=True`` for the longest run of settled delivery tags, plus single acks
  for settled tags after a gap (a slow message never holds back the others' acks).
- Each subscription has its own channel, so its prefetch and failures are its own.
- Declarations run on a throwaway channel: a ``PRECONDITION_FAILED`` closes only that
  channel and becomes a :class:`~choreo.errors.TopologyError` naming the differing argument.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, cast

import aio_pika
import aio_pika.abc
import aiormq.abc
import aiormq.exceptions
from aio_pika.connection import make_url
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aiormq import spec as amqp_spec
from yarl import URL

from ..errors import ConfigError, PublishNotConfirmed, TopologyError, TransportError
from ..topology import QueueSpec, QueueState, Topology
from .base import Delivery, DeliveryHandler, OutgoingMessage, Subscription, Transport

__all__ = ["RabbitMQTransport", "amqp_urls"]

# A comma separates two URLs only where the next one starts (``scheme://``): commas inside a
# password or a query string stay where they are.
_URL_SEPARATOR = re.compile(r"\s*,\s*(?=[a-z][a-z0-9+.-]*://)", re.IGNORECASE)


def amqp_urls(value: str) -> tuple[str, ...]:
    """The broker URLs in ``value`` (``CHOREO_AMQP_URL``): one URL, or several separated by
    commas (the nodes of one cluster), in the order given. Each is complete on its own
    (credentials, vhost, query); stray commas and blanks around them are ignored."""
    pieces = (piece.strip().rstrip(",").rstrip() for piece in _URL_SEPARATOR.split(value.strip()))
    urls = tuple(url for url in pieces if url)
    if not urls:
        raise ConfigError("CHOREO_AMQP_URL is empty")
    for url in urls:
        try:
            parts = urllib.parse.urlsplit(url)
            host = parts.hostname
            parts.port  # noqa: B018  (raises on a port that is not a number)
        except ValueError:
            host = None
        if parts.scheme.lower() not in ("amqp", "amqps") or not host or any(c.isspace() for c in url):
            raise ConfigError(f"not an amqp:// or amqps:// URL with a host: {_redact(url)!r}")
    return urls


_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<arg>[^']+)' for (?P<kind>queue|exchange) '(?P<name>[^']+)'.*?"
    # 3.10: "received '5' but current is '3'"; later: "received the value '5' of type 'long' but current is ..."
    r"received (?:(?:the value )?'(?P<received>[^']*)'|none).*?"
    r"but current is (?:(?:the value )?'(?P<current>[^']*)'|none)"
)


def _topology_error(exc: BaseException, entity: str) -> TopologyError:
    text = str(exc)
    match = _INEQUIVALENT.search(text)
    if match:
        arg = match["arg"]
        declared, existing = match["received"] or "none", match["current"] or "none"
        return TopologyError(
            f"{match['kind']} {match['name']!r} exists with a different {arg}: "
            f"declared {declared}, existing {existing}. "
            "Align the agent's settings with the queue, or drain, delete and re-declare the queue "
            "(`rabbitmqctl list_queues name arguments` shows what exists).",
            entity=match["name"],
            differences={arg: (declared, existing)},
        )
    return TopologyError(f"cannot declare {entity!r}: {text}", entity=entity)


_PENDING, _TO_ACK, _SENT = 0, 1, 2


class _ChannelAcks:
    """Delivery tags of one aiormq channel, in delivery order, with their settle state."""

    __slots__ = ("channel", "lock", "order", "state", "waiters")

    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        self.channel = channel
        # One flush at a time per channel: a later flush's multiple ack must not overtake an
        # earlier flush's single acks, or it would ack their tags first (an unknown-tag channel error).
        self.lock = asyncio.Lock()
        self.order: collections.deque[int] = collections.deque()
        self.state: dict[int, int] = {}
        self.waiters: list[asyncio.Future[None]] = []


class _AckBatcher:
    """Collects the acks of one subscription and sends them once per event-loop turn.

    ``basic.ack multiple=True`` for tag T acks every unacked tag up to T on that channel, so T
    is only ever the last to-ack tag of a prefix in which every tag is settled by us. Nacks go
    out at once and count as settled. A waiter of :meth:`ack` resumes once its frame is written.
    """

    def __init__(self) -> None:
        self._channels: dict[int, _ChannelAcks] = {}
        self._flush_task: asyncio.Task[None] | None = None

    def delivered(self, channel: aiormq.abc.AbstractChannel, tag: int) -> None:
        acks = self._channels.get(id(channel))
        if acks is None or acks.channel is not channel:
            acks = self._channels[id(channel)] = _ChannelAcks(channel)
            # Channels of earlier connections are gone; their unacked messages are redelivered.
            for key in [k for k, a in self._channels.items() if a.channel.is_closed and a is not acks]:
                del self._channels[key]
        acks.order.append(tag)
        acks.state[tag] = _PENDING

    def ack(self, channel: aiormq.abc.AbstractChannel, tag: int) -> asyncio.Future[None]:
        acks = self._channels[id(channel)]
        acks.state[tag] = _TO_ACK
        future = asyncio.get_running_loop().create_future()
        acks.waiters.append(future)
        if self._flush_task is None:
            self._flush_task = asyncio.get_running_loop().create_task(self._flush())
        return future

    def settled(self, channel: aiormq.abc.AbstractChannel, tag: int) -> None:
        """``tag`` was nacked or rejected on its own."""
        acks = self._channels.get(id(channel))
        if acks is not None and tag in acks.state:
            acks.state[tag] = _SENT

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let every handler finishing in this turn add its ack
        self._flush_task = None
        for acks in list(self._channels.values()):
            if acks.waiters:
                await self._flush_channel(acks)

    @staticmethod
    async def _flush_channel(acks: _ChannelAcks) -> None:
        async with acks.lock:
            if acks.waiters:
                await _AckBatcher._send(acks)

    @staticmethod
    async def _send(acks: _ChannelAcks) -> None:
        waiters, acks.waiters = acks.waiters, []
        order, state = acks.order, acks.state
        last = 0
        while order and state[order[0]] != _PENDING:  # the settled prefix
            tag = order.popleft()
            if state.pop(tag) == _TO_ACK:
                last = tag
        singles = [tag for tag, st in state.items() if st == _TO_ACK]  # settled after a gap
        for tag in singles:
            state[tag] = _SENT
        error: BaseException | None = None
        try:
            if last:
                await acks.channel.basic_ack(last, multiple=True)
            for tag in singles:
                await acks.channel.basic_ack(tag)
        except (*CONNECTION_EXCEPTIONS, RuntimeError) as exc:
            error = TransportError(f"ack failed (the broker will redeliver): {exc!r}")
        for future in waiters:
            if future.done():
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)


class _RabbitDelivery:
    """A delivery straight from aiormq: properties are read from the frame only when asked."""

    __slots__ = ("_acks", "_msg", "_props")

    def __init__(self, msg: aiormq.abc.DeliveredMessage, acks: _AckBatcher | None = None) -> None:
        self._msg = msg
        self._props = msg.header.properties
        self._acks = acks  # None: ack on its own (basic.get, where several stay unacked on purpose)

    @property
    def body(self) -> bytes:
        return self._msg.body

    @property
    def headers(self) -> Mapping[str, object]:
        return self._props.headers or _NO_HEADERS

    @property
    def routing_key(self) -> str:
        return self._msg.routing_key or ""

    @property
    def exchange(self) -> str:
        return self._msg.exchange or ""

    @property
    def message_id(self) -> str | None:
        return self._props.message_id

    @property
    def redelivered(self) -> bool:
        return bool(self._msg.redelivered)

    @property
    def correlation_id(self) -> str | None:
        return self._props.correlation_id

    @property
    def type(self) -> str | None:
        return self._props.message_type

    async def ack(self) -> None:
        msg = self._msg
        if self._acks is not None:
            await self._acks.ack(msg.channel, msg.delivery_tag or 0)
            return
        try:
            await msg.channel.basic_ack(msg.delivery_tag or 0)
        except (*CONNECTION_EXCEPTIONS, RuntimeError) as exc:
            raise TransportError(f"ack failed (the broker will redeliver): {exc!r}") from exc

    async def nack(self, *, requeue: bool) -> None:
        msg = self._msg
        if self._acks is not None:
            self._acks.settled(msg.channel, msg.delivery_tag or 0)
        try:
            await msg.channel.basic_nack(msg.delivery_tag or 0, requeue=requeue)
        except (*CONNECTION_EXCEPTIONS, RuntimeError) as exc:
            raise TransportError(f"nack failed (the broker will redeliver): {exc!r}") from exc


_NO_HEADERS: Mapping[str, object] = MappingProxyType({})
_RESTORE_BACKOFF_S = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0)


class _RabbitSubscription:
    """A consumer registered directly on the aiormq channel under a robust aio-pika channel.

    aio-pika re-opens the channel (and re-applies its prefetch) after a lost connection or a
    channel error; the consumer itself is ours to restore: after every re-open, and after a
    broker-side ``basic.cancel`` (the queue was deleted, or its node went away), it is
    consumed again under the same tag once the queue exists, with backoff. Deliveries go to
    the handler in aiormq's own task per delivery, with no wrapper objects in between.
    """

    def __init__(
        self,
        channel: aio_pika.abc.AbstractRobustChannel,
        queue: str,
        handler: DeliveryHandler,
        transport: RabbitMQTransport,
    ) -> None:
        self._channel = channel
        self._queue = queue
        self._handler = handler
        self._transport = transport
        self._tag = f"choreo.{queue}.{uuid.uuid4().hex[:12]}"
        self._acks = _AckBatcher()
        self._cancelled = False
        self._restore_task: asyncio.Task[None] | None = None
        channel.reopen_callbacks.add(self._on_reopen)

    @property
    def queue(self) -> str:
        return self._queue

    async def _on_message(self, msg: aiormq.abc.DeliveredMessage) -> None:
        self._acks.delivered(msg.channel, msg.delivery_tag or 0)
        await self._handler(_RabbitDelivery(msg, self._acks))

    async def consume(self) -> None:
        """Register the consumer on the channel open now (a no-op if it is registered)."""
        underlay = cast(aiormq.Channel, await self._channel.get_underlay_channel())
        if self._cancelled or self._tag in underlay.consumers:
            return
        underlay.on_consumer_cancel_callbacks.add(self._on_broker_cancel)
        await underlay.basic_consume(self._queue, self._on_message, consumer_tag=self._tag, timeout=10.0)

    def _on_reopen(self, *_: object) -> None:
        self._schedule_restore()

    def _on_broker_cancel(self, frame: object) -> None:
        if getattr(frame, "consumer_tag", None) == self._tag and not self._cancelled:
            self._schedule_restore()

    def _schedule_restore(self) -> None:
        if self._cancelled or (self._restore_task is not None and not self._restore_task.done()):
            return
        self._restore_task = asyncio.get_running_loop().create_task(self._restore())

    async def _restore(self) -> None:
        attempt = 0
        while not self._cancelled:
            try:
                # Consuming a missing queue is a channel error: look for it on a throwaway channel.
                if await self._transport.queue_exists(self._queue):
                    await self.consume()
                    return
            except (TimeoutError, *CONNECTION_EXCEPTIONS, RuntimeError, TransportError):
                pass  # the connection is still down, or the channel is being re-opened: try again
            await asyncio.sleep(_RESTORE_BACKOFF_S[min(attempt, len(_RESTORE_BACKOFF_S) - 1)])
            attempt += 1

    async def is_attached(self) -> bool:
        """Our consumer tag is registered on the channel open right now; after a reconnect or a
        broker-side cancel this turns true again only once the consumer is restored."""
        if self._cancelled or self._channel.is_closed:
            return False
        try:
            underlay = cast(aiormq.Channel, await self._channel.get_underlay_channel())
        except (aio_pika.exceptions.ChannelInvalidStateError, RuntimeError):
            return False
        return not underlay.is_closed and self._tag in underlay.consumers

    async def cancel(self) -> None:
        if self._cancelled:
            return
        self._cancelled = True
        self._channel.reopen_callbacks.discard(self._on_reopen)
        if self._restore_task is not None:
            self._restore_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._restore_task
        if self._channel.is_closed or not self._transport.connected:
            return  # the broker already stopped delivering; waiting for a reconnect could hang
        try:
            underlay = cast(aiormq.Channel, await asyncio.wait_for(self._channel.get_underlay_channel(), 5.0))
            if self._tag in underlay.consumers:
                await asyncio.wait_for(underlay.basic_cancel(self._tag), 5.0)
        except (TimeoutError, *CONNECTION_EXCEPTIONS, RuntimeError, KeyError):
            pass  # the channel went away meanwhile: nothing more will be delivered on it

    async def close(self) -> None:
        await self.cancel()
        if not self._channel.is_closed:
            with contextlib.suppress(TimeoutError, *CONNECTION_EXCEPTIONS, RuntimeError):
                await asyncio.wait_for(self._channel.close(), 5.0)


class _FailoverConnection(aio_pika.RobustConnection):
    """A robust connection that moves on to the next URL whenever a connection closes.

    aio-pika reports both a lost connection and a failed connection attempt through
    ``_on_connection_close`` (the underlay connect calls it before raising), and every attempt,
    first or re-, connects to ``self.url``. Advancing ``self.url`` there, before the robust
    connection schedules its next attempt, makes reconnects go round the URLs; channels and
    consumers are restored on whichever node answers. With one URL nothing changes.
    """

    def __init__(self, urls: Sequence[URL], **kwargs: Any) -> None:
        super().__init__(urls[0], **kwargs)
        self.urls = tuple(urls)
        self._at = 0

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        if not self.close_called and len(self.urls) > 1:
            self._at = (self._at + 1) % len(self.urls)
            self.url = self.urls[self._at]
        await super()._on_connection_close(closing)


class RabbitMQTransport(Transport):
    """``url`` is one AMQP URL or several comma-separated ones (nodes of one cluster)."""

    def __init__(self, url: str, *, connection_name: str = "choreo", timeout: float = 10.0) -> None:
        self.url = url
        self.urls = amqp_urls(url)
        self.connection_name = connection_name
        self.timeout = timeout
        self._conn: _FailoverConnection | None = None
        self._pub: aio_pika.abc.AbstractRobustChannel | None = None
        self._exchanges: dict[str, aio_pika.abc.AbstractExchange] = {}
        self._subs: list[_RabbitSubscription] = []
        self._get_channel: aio_pika.abc.AbstractChannel | None = None

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed and self._conn.connected.is_set()

    @property
    def connection(self) -> aio_pika.abc.AbstractRobustConnection:
        if self._conn is None:
            raise TransportError("not connected: use `async with transport` or await connect()")
        return self._conn

    @property
    def connected_url(self) -> str | None:
        """The URL (password masked) of the node the connection uses, or tries next while
        reconnecting."""
        return None if self._conn is None else _redact(str(self._conn.url))

    async def connect(self) -> None:
        """Connect to the first URL that answers, in order; reconnects later rotate from there."""
        urls = [make_url(url) for url in self.urls]
        failures: list[str] = []
        for start in range(len(urls)):
            conn = _FailoverConnection(
                urls[start:] + urls[:start], client_properties={"connection_name": self.connection_name}
            )
            try:
                await conn.connect(timeout=self.timeout)
            except (TimeoutError, *CONNECTION_EXCEPTIONS, OSError) as exc:
                failures.append(f"{_redact(self.urls[start])}: {exc!r}")
                with contextlib.suppress(TimeoutError, *CONNECTION_EXCEPTIONS, RuntimeError):
                    await asyncio.wait_for(conn.close(), 10.0)
                continue
            self._conn = conn
            break
        else:
            where = failures[0] if len(failures) == 1 else "any of " + "; ".join(failures)
            raise TransportError(f"cannot connect to RabbitMQ at {where}")
        self._pub = await self._conn.channel(publisher_confirms=True, on_return_raises=True)

    async def close(self) -> None:
        for sub in self._subs:
            await sub.close()
        self._subs.clear()
        if self._conn is not None:
            with contextlib.suppress(TimeoutError, *CONNECTION_EXCEPTIONS, RuntimeError):
                await asyncio.wait_for(self._conn.close(), 10.0)
        self._conn = None
        self._pub = None
        self._get_channel = None
        self._exchanges.clear()

    @contextlib.asynccontextmanager
    async def _temp_channel(self) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
        """A channel for one operation: a channel error (404, 406) closes it, not a shared one."""
        channel = await self.connection.channel()
        try:
            yield channel
        finally:
            if not channel.is_closed:
                with contextlib.suppress(*CONNECTION_EXCEPTIONS, RuntimeError):
                    await channel.close()

    async def declare(self, topology: Topology) -> None:
        async with self._temp_channel() as channel:
            try:
                exchange = await channel.declare_exchange(topology.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                raise _topology_error(exc, topology.exchange) from exc
            for spec in topology.queues:
                try:
                    queue = await channel.declare_queue(spec.name, durable=True, arguments=dict(spec.arguments))
                except aiormq.exceptions.ChannelPreconditionFailed as exc:
                    raise _topology_error(exc, spec.name) from exc
                for key in spec.bindings:
                    await queue.bind(exchange, key)

    async def _exchange(self, name: str) -> aio_pika.abc.AbstractExchange:
        assert self._pub is not None
        if name == "":
            return self._pub.default_exchange
        exchange = self._exchanges.get(name)
        if exchange is None:
            exchange = await self._pub.get_exchange(name, ensure=False)
            self._exchanges[name] = exchange
        return exchange

    async def publish(self, message: OutgoingMessage) -> None:
        if self._pub is None:
            raise PublishNotConfirmed("not connected")
        properties = amqp_spec.Basic.Properties(
            content_type="application/json",
            delivery_mode=2,  # persistent
            headers=cast(Any, message.headers) or None,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            message_type=message.type,
            timestamp=datetime.now(UTC),
            expiration=str(message.expiration_ms) if message.expiration_ms is not None else None,
        )
        # A connection or channel loss is ridden out: wait (bounded) for the robust channel to
        # come back and publish again. Re-publishing is safe: ids are stable, dedup absorbs copies.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            try:
                channel = await self._pub.get_underlay_channel()
                await channel.basic_publish(
                    message.body,
                    exchange=message.exchange,
                    routing_key=message.routing_key,
                    properties=properties,
                    mandatory=message.mandatory,
                    timeout=self.timeout,
                )
                return
            except aio_pika.exceptions.DeliveryError as exc:
                raise PublishNotConfirmed(f"broker refused {message.routing_key!r}: {exc!r}") from exc
            except aio_pika.exceptions.PublishError as exc:
                raise PublishNotConfirmed(
                    f"unroutable: exchange {message.exchange!r}, routing key {message.routing_key!r}"
                ) from exc
            except (TimeoutError, *CONNECTION_EXCEPTIONS, RuntimeError) as exc:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise PublishNotConfirmed(f"publish of {message.routing_key!r} not confirmed: {exc!r}") from exc
                try:
                    await asyncio.wait_for(self._pub.ready(), remaining)
                except (TimeoutError, *CONNECTION_EXCEPTIONS, RuntimeError):
                    raise PublishNotConfirmed(f"publish of {message.routing_key!r} not confirmed: {exc!r}") from exc

    async def publish_many(self, messages: Sequence[OutgoingMessage]) -> None:
        if len(messages) == 1:
            await self.publish(messages[0])
            return
        results = await asyncio.gather(*(self.publish(m) for m in messages), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def subscribe(self, queue: str, handler: DeliveryHandler, *, prefetch: int) -> Subscription:
        if not await self.queue_exists(queue):
            raise TransportError(f"queue {queue!r} does not exist: declare the topology first")
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        sub = _RabbitSubscription(channel, queue, handler, self)
        try:
            await sub.consume()
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            await sub.close()
            raise TransportError(f"queue {queue!r} does not exist: declare the topology first") from exc
        self._subs.append(sub)
        return sub

    async def _passive_declare(self, queue: str) -> aiormq.spec.Queue.DeclareOk | None:
        """The broker's declare-ok for ``queue`` (depth, consumers), or None if it does not
        exist; on a throwaway channel, since a missing queue closes the channel it is asked on."""
        async with self._temp_channel() as channel:
            try:
                declared = await channel.declare_queue(queue, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                return None
            return declared.declaration_result

    async def queue_exists(self, queue: str) -> bool:
        return await self._passive_declare(queue) is not None

    async def inspect_queue(self, spec: QueueSpec) -> QueueState:
        """Passive declare for existence, depth and consumers; then, on an existing queue only,
        a declare with the spec's arguments, which is a no-op when they match and otherwise
        fails naming the differing argument (AMQP reports one difference at a time)."""
        result = await self._passive_declare(spec.name)
        if result is None:
            return QueueState(spec.name, exists=False)
        drift: dict[str, tuple[object, object]] = {}
        async with self._temp_channel() as channel:
            try:
                await channel.declare_queue(spec.name, durable=True, arguments=dict(spec.arguments))
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                drift = dict(_topology_error(exc, spec.name).differences)
        return QueueState(spec.name, True, result.message_count or 0, result.consumer_count or 0, drift)

    async def queue_depth(self, queue: str) -> int:
        result = await self._passive_declare(queue)
        if result is None:
            raise TransportError(f"queue {queue!r} does not exist")
        return result.message_count or 0

    async def get(self, queue: str) -> Delivery | None:
        """basic.get on a channel of its own: a missing queue closes that channel (and is
        reopened next time), never the publishing channel the agents share."""
        if self._get_channel is None or self._get_channel.is_closed:
            self._get_channel = await self.connection.channel()
        try:
            underlay = await self._get_channel.get_underlay_channel()
            msg = await underlay.basic_get(queue, no_ack=False, timeout=self.timeout)
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            self._get_channel = None
            raise TransportError(f"NOT_FOUND - no queue {queue!r}") from exc
        except (TimeoutError, *CONNECTION_EXCEPTIONS, RuntimeError) as exc:
            self._get_channel = None
            raise TransportError(f"basic.get on {queue!r} failed: {exc!r}") from exc
        if msg.delivery_tag is None:  # basic.get-empty
            return None
        return _RabbitDelivery(msg)

    async def delete_queue(self, queue: str) -> None:
        async with self._temp_channel() as channel:
            await channel.queue_delete(queue)

    async def delete_exchange(self, exchange: str) -> None:
        async with self._temp_channel() as channel:
            await channel.exchange_delete(exchange)


def _redact(url: str) -> str:
    return re.sub(r"//([^:/@]+):([^@]+)@", r"//\1:***@", url)
