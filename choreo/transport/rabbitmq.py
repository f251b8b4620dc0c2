"""RabbitMQ transport on choreo's own AMQP client (:mod:`choreo.transport.amqp`).

- One connection, kept up by :class:`_Link`. Several comma-separated URLs (the nodes of one
  cluster): connecting tries them in order; after a lost connection or a failed attempt, the
  next reconnect goes to the next URL.
- Publishing goes through one channel with publisher confirms; ``publish`` returns only
  after the broker's ack, and rides out a lost connection or channel (bounded by
  ``timeout``) by publishing again. Mandatory publishes (queue moves) go one at a time on a
  channel of their own and raise when the broker returns them.
- Each subscription has its own channel, so its prefetch and failures are its own, and
  restores its consumer after a lost connection, a channel error or a broker-side cancel.
- Acks are batched per channel: the acks requested in one event-loop turn go out as one
  ``basic.ack multiple=True`` for the longest run of settled delivery tags, plus single acks
  for settled tags after a gap (a slow message never holds back the others' acks).
- Declarations run on a throwaway channel: a ``PRECONDITION_FAILED`` closes only that
  channel and becomes a :class:`~choreo.errors.TopologyError` naming the differing argument.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import struct
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from ..errors import ConfigError, HeadersNotSendable, PublishNotConfirmed, TopologyError, TransportError
from ..log import get_logger
from ..topology import QueueSpec, QueueState, Topology
from .amqp.connection import Channel, ChannelClosedError, Connection, Endpoint, Message, PublishNackedError
from .amqp.frames import (
    HeaderTooLargeError,
    Properties,
    commands,
    encode_ack,
    encode_nack,
    encode_properties,
    encode_publish,
)
from .base import Delivery, DeliveryHandler, OutgoingMessage, Subscription, Transport

__all__ = ["RabbitMQTransport", "amqp_urls"]

Exchange, Queue = commands.Exchange, commands.Queue
log = get_logger("choreo.transport")

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


class _Acks:
    """Delivery tags of one channel, in delivery order, with their settle state.

    Acks are held back to go out together: ``basic.ack multiple=True`` for tag T acks every
    unacked tag up to T on the channel, so T is only ever the last to-ack tag of a prefix in
    which every tag is settled by us; tags settled after a gap get single acks. With a window
    of 0 the acks requested in one loop turn go out at its end. With a window, they wait until
    whichever comes first: the connection writes anything else (they join that write), the
    window has passed since the first of them, or ``batch`` of them are waiting. Nacks go out
    at once and count as settled.

    Holding an ack back never weakens a guarantee: it is requested only once the message's
    effects are durable, and a message whose ack is lost (the connection drops meanwhile) is
    redelivered and absorbed by dedup. What it saves is a write, a broker wake-up and, on a
    quorum queue, a settle command in the queue's log per message.
    """

    __slots__ = ("batch", "channel", "order", "riding", "soon", "state", "timer", "waiters", "window_s")

    def __init__(self, channel: Channel, *, window_s: float = 0.0, batch: int = 1) -> None:
        self.channel = channel
        self.window_s = window_s
        self.batch = max(1, batch)
        self.order: collections.deque[int] = collections.deque()
        self.state: dict[int, int] = {}
        self.waiters: list[asyncio.Future[None]] = []
        self.soon = False  # a flush at the end of this turn is scheduled
        self.timer: asyncio.TimerHandle | None = None  # the window's end
        self.riding = False  # registered to join the connection's next write

    def delivered(self, tag: int) -> None:
        self.order.append(tag)
        self.state[tag] = _PENDING

    def ack(self, tag: int) -> asyncio.Future[None]:
        """Resolves once the ack frame is handed to the socket; fails with TransportError if
        the channel is gone (the broker then redelivers)."""
        self.state[tag] = _TO_ACK
        loop = self.channel.connection.loop
        future = loop.create_future()
        self.waiters.append(future)
        if self.soon:
            return future
        if self.window_s <= 0 or len(self.waiters) >= self.batch:
            self.soon = True
            loop.call_soon(self.flush)
            return future
        if self.timer is None:
            self.timer = loop.call_later(self.window_s, self.flush)
        if not self.riding:
            self.riding = True
            self.channel.connection.before_next_write(self._ride)
        return future

    def settled(self, tag: int) -> None:
        if tag in self.state:
            self.state[tag] = _SENT

    def _ride(self) -> None:
        self.riding = False
        if self.waiters:
            self.flush()

    def flush(self) -> None:
        """Send every ack requested so far, now."""
        self.soon = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        waiters, self.waiters = self.waiters, []
        order, state = self.order, self.state
        last = 0
        while order and state[order[0]] != _PENDING:  # the settled prefix
            tag = order.popleft()
            if state.pop(tag) == _TO_ACK:
                last = tag
        out = [encode_ack(self.channel.number, last, multiple=True)] if last else []
        for tag, st in state.items():  # settled after a gap
            if st == _TO_ACK:
                state[tag] = _SENT
                out.append(encode_ack(self.channel.number, tag))
        error: TransportError | None = None
        try:
            if out:
                self.channel.send(b"".join(out))
        except TransportError as exc:
            error = TransportError(f"ack failed (the broker will redeliver): {exc}")
        for future in waiters:
            if future.done():
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)


class _RabbitDelivery:
    """A delivery: the broker's message plus how to settle it."""

    __slots__ = ("_acks", "_msg", "_props")

    def __init__(self, msg: Message, acks: _Acks | None = None) -> None:
        self._msg = msg
        self._props = msg.properties
        self._acks = acks  # None: ack on its own (basic.get, where several stay unacked on purpose)

    @property
    def body(self) -> bytes:
        return self._msg.body

    @property
    def headers(self) -> Mapping[str, object]:
        return self._props.headers or _NO_HEADERS

    @property
    def routing_key(self) -> str:
        return self._msg.routing_key

    @property
    def exchange(self) -> str:
        return self._msg.exchange

    @property
    def message_id(self) -> str | None:
        return self._props.message_id

    @property
    def redelivered(self) -> bool:
        return self._msg.redelivered

    @property
    def correlation_id(self) -> str | None:
        return self._props.correlation_id

    @property
    def type(self) -> str | None:
        return self._props.type

    def ack(self) -> Awaitable[None]:
        if self._acks is not None:
            # The batch's future itself: the caller resumes through no coroutine of ours.
            return self._acks.ack(self._msg.delivery_tag)
        return self._ack_alone()

    async def _ack_alone(self) -> None:
        msg = self._msg
        try:
            msg.channel.send(encode_ack(msg.channel.number, msg.delivery_tag))
        except TransportError as exc:
            raise TransportError(f"ack failed (the broker will redeliver): {exc}") from exc

    async def nack(self, *, requeue: bool) -> None:
        msg = self._msg
        if self._acks is not None:
            self._acks.settled(msg.delivery_tag)
        try:
            msg.channel.send(encode_nack(msg.channel.number, msg.delivery_tag, requeue=requeue))
        except TransportError as exc:
            raise TransportError(f"nack failed (the broker will redeliver): {exc}") from exc


_NO_HEADERS: Mapping[str, object] = MappingProxyType({})
_RESTORE_BACKOFF_S = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
# A connection lost sooner than this after it opened counts as a flap: the next reconnect
# waits first, longer each time, so a connection that keeps dying at once is not reopened in a
# tight loop (a poison message that closes it on every delivery, a node still shutting down).
_FLAP_S = 5.0


class _Link:
    """The transport's connection, kept up across losses.

    Connecting tries the URLs in order. After a lost connection, reconnects go round the URLs
    starting with the next one, with backoff, until :meth:`close`. :meth:`up` waits (bounded)
    for a live connection; :meth:`wait_up` waits without a bound.
    """

    def __init__(self, urls: Sequence[str], name: str, timeout: float) -> None:
        self.urls = tuple(urls)
        self.endpoints = [Endpoint.from_url(url) for url in urls]
        self.name = name
        self.timeout = timeout
        self.conn: Connection | None = None
        self.at = 0
        self._up = asyncio.Event()
        self._closing = False
        self._reconnect_task: asyncio.Task[None] | None = None
        self._attached_at = 0.0
        self._flaps = 0  # connections in a row that were lost within _FLAP_S

    async def connect(self) -> None:
        failures: list[str] = []
        for at, endpoint in enumerate(self.endpoints):
            try:
                conn = await Connection.open(endpoint, name=self.name, within=self.timeout)
            except TransportError as exc:
                failures.append(f"{_redact(self.urls[at])}: {exc}")
                continue
            if conn.closed is not None:  # closed in the very read that opened it
                failures.append(f"{_redact(self.urls[at])}: {conn.closed}")
                continue
            self._attach(conn, at)
            return
        where = failures[0] if len(failures) == 1 else "any of " + "; ".join(failures)
        raise TransportError(f"cannot connect to RabbitMQ at {where}")

    def _attach(self, conn: Connection, at: int) -> None:
        """Adopt an open connection. Call only with ``conn.closed is None``: a connection lost
        before this set ``on_lost`` would never report it, and the link would stay "up"."""
        conn.rpc_timeout = self.timeout
        self.conn, self.at = conn, at
        self._attached_at = asyncio.get_running_loop().time()
        conn.on_lost = self._on_lost
        conn.on_blocked = self._on_blocked
        if conn.blocked is not None:  # blocked already during the handshake
            self._on_blocked(conn.blocked)
        self._up.set()

    def _on_blocked(self, reason: str | None) -> None:
        url = _redact(self.urls[self.at])
        if reason is not None:
            log.warning("broker blocked publishing (resource alarm); publishes wait", url=url, reason=reason)
        else:
            log.info("broker unblocked publishing", url=url)

    def _on_lost(self, exc: TransportError) -> None:
        self._up.clear()
        if self._closing or (self._reconnect_task is not None and not self._reconnect_task.done()):
            return
        log.warning("connection to RabbitMQ lost; reconnecting", url=_redact(self.urls[self.at]), reason=str(exc))
        self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        attempt = 0
        if asyncio.get_running_loop().time() - self._attached_at < _FLAP_S:
            self._flaps += 1
            pause = _RESTORE_BACKOFF_S[min(self._flaps - 1, len(_RESTORE_BACKOFF_S) - 1)]
            if self._flaps > 1:
                log.warning("connection keeps closing soon after it opens; reconnecting more slowly", pause_s=pause)
            await asyncio.sleep(pause)
        else:
            self._flaps = 0
        while not self._closing:
            at = (self.at + 1) % len(self.endpoints)
            self.at = at  # a failed attempt moves on too: the next one tries the next node
            try:
                conn = await Connection.open(self.endpoints[at], name=self.name, within=self.timeout)
            except Exception as exc:  # whatever failed, the link must keep trying
                if not isinstance(exc, TransportError):
                    log.warning("reconnect attempt failed", url=_redact(self.urls[at]), error=repr(exc))
                await asyncio.sleep(_RESTORE_BACKOFF_S[min(attempt, len(_RESTORE_BACKOFF_S) - 1)])
                attempt += 1
                continue
            if self._closing:
                await conn.close()
                return
            if conn.closed is not None:  # closed in the very read that opened it: a failed attempt
                log.warning("reconnect attempt failed", url=_redact(self.urls[at]), error=str(conn.closed))
                await asyncio.sleep(_RESTORE_BACKOFF_S[min(attempt, len(_RESTORE_BACKOFF_S) - 1)])
                attempt += 1
                continue
            self._attach(conn, at)
            log.info("reconnected to RabbitMQ", url=_redact(self.urls[at]), failed_attempts=attempt)
            return

    @property
    def connected(self) -> bool:
        return self.conn is not None and self.conn.is_open

    async def up(self, within: float | None = None) -> Connection:
        """The live connection, waiting up to ``within`` seconds (default: the transport's) for a
        reconnect; raises TransportError when there is none by then."""
        conn = self.conn
        if conn is not None and conn.is_open:
            return conn
        if self._closing or self.conn is None:
            raise TransportError("not connected: use `async with transport` or await connect()")
        try:
            async with asyncio.timeout(self.timeout if within is None else within):
                return await self.wait_up()
        except TimeoutError:
            raise TransportError("no connection to RabbitMQ (reconnecting)") from None

    async def wait_up(self) -> Connection:
        while True:
            await self._up.wait()
            conn = self.conn
            if conn is not None and conn.is_open:
                return conn
            if self._closing:
                raise TransportError("the transport is closed")
            self._up.clear()

    async def close(self) -> None:
        self._closing = True
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnect_task
        if self.conn is not None:
            await self.conn.close()
        self._up.set()  # wake waiters: they see the link closed


class _RabbitSubscription:
    """A consumer on a channel of its own, restored by itself.

    After a lost connection, a channel error, or a broker-side ``basic.cancel`` (the queue was
    deleted, or its node went away), it is consumed again under the same tag once the
    connection is back and the queue exists, with backoff. Each delivery runs the handler in
    a task of its own; the deliveries of one socket read start in the same loop turn.
    """

    def __init__(self, transport: RabbitMQTransport, queue: str, handler: DeliveryHandler, prefetch: int) -> None:
        self._transport = transport
        self._queue = queue
        self._handler = handler
        self._prefetch = prefetch
        self._tag = f"choreo.{queue}.{uuid.uuid4().hex[:12]}"
        self._channel: Channel | None = None
        self._acks: _Acks | None = None
        self._cancelled = False
        self._restore_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def queue(self) -> str:
        return self._queue

    def _on_message(self, msg: Message) -> None:
        acks = self._acks
        assert acks is not None
        acks.delivered(msg.delivery_tag)
        task = asyncio.get_running_loop().create_task(self._handler(_RabbitDelivery(msg, acks)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def consume(self) -> None:
        """Open a channel (unless the current one is usable), set its prefetch and consume."""
        if self._cancelled:
            return
        channel = self._channel
        if channel is None or not channel.is_open:
            conn = await self._transport._link.up()
            channel = await conn.channel()
            channel.on_close.append(self._on_channel_closed)
            channel.on_cancel = self._on_broker_cancel
            await channel.qos(self._prefetch)
            # A quarter of the prefetch waiting is enough company: the broker must not run out
            # of deliveries to send while acks wait.
            acks = _Acks(channel, window_s=self._transport.ack_window_s, batch=self._prefetch // 4)
            self._channel, self._acks = channel, acks
        if self._tag not in channel.consumers:
            await channel.consume(self._queue, self._tag, self._on_message)

    def _on_channel_closed(self, exc: TransportError) -> None:
        acks = self._acks
        if acks is not None and acks.channel is self._channel:
            acks.flush()  # acks held for company can no longer go: their waiters learn it now
        self._schedule_restore()

    def _on_broker_cancel(self, tag: str) -> None:
        if tag == self._tag:
            self._schedule_restore()

    def _schedule_restore(self) -> None:
        if self._cancelled or (self._restore_task is not None and not self._restore_task.done()):
            return
        self._restore_task = asyncio.get_running_loop().create_task(self._restore())

    async def _restore(self) -> None:
        attempt = 0
        while not self._cancelled:
            try:
                await self._transport._link.wait_up()
                # Consuming a missing queue is a channel error: look for it on a throwaway channel.
                if await self._transport.queue_exists(self._queue):
                    await self.consume()
                    # A cancel or a channel close arriving while this task was still running
                    # did not start another restore: check that the consumer is really there.
                    if await self.is_attached():
                        log.info("consumer restored", queue=self._queue, failed_attempts=attempt)
                        return
            except TransportError as exc:
                # The connection went again, the channel closed meanwhile, or the broker is slow
                # to answer (a queue electing a new leader): try again.
                if attempt == 0:
                    log.warning("consumer not restored yet; retrying", queue=self._queue, reason=str(exc))
            await asyncio.sleep(_RESTORE_BACKOFF_S[min(attempt, len(_RESTORE_BACKOFF_S) - 1)])
            attempt += 1

    async def is_attached(self) -> bool:
        """Our consumer is registered on the channel open right now; after a reconnect or a
        broker-side cancel this turns true again only once the consumer is restored."""
        channel = self._channel
        return not self._cancelled and channel is not None and channel.is_open and self._tag in channel.consumers

    async def cancel(self) -> None:
        if self._cancelled:
            return
        self._cancelled = True
        if self._restore_task is not None:
            self._restore_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._restore_task
        channel = self._channel
        if channel is None or not channel.is_open or self._tag not in channel.consumers:
            return  # the broker already stopped delivering
        with contextlib.suppress(TimeoutError, TransportError):
            async with asyncio.timeout(5.0):
                await channel.cancel(self._tag)

    async def close(self) -> None:
        await self.cancel()  # held acks ride on its basic.cancel
        if self._acks is not None:
            # Acks asked for since would ride on the close, after it, and be discarded.
            self._acks.flush()
        if self._channel is not None and self._channel.is_open:
            with contextlib.suppress(TimeoutError, TransportError):
                async with asyncio.timeout(5.0):
                    await self._channel.close()


_MISSING_EXCHANGE = re.compile(r"no exchange '(?P<name>[^']*)'")


class _Confirms:
    """Publishing with publisher confirms on one channel, re-opened on demand."""

    def __init__(self, link: _Link, timeout: float) -> None:
        self._link = link
        self._timeout = timeout
        self._channel: Channel | None = None
        self._opening = asyncio.Lock()
        self._sweeper: asyncio.TimerHandle | None = None
        self._replaced_at = 0.0
        self._retiring: set[asyncio.Task[None]] = set()

    def nacked(self, channel: Channel) -> None:
        """The broker nacked a publish on ``channel``. Publish on a fresh channel from now on
        (at most once a second): a channel that kept a queue's old leader in mind after a node
        left the cluster was seen to nack every later publish, while a new channel did not."""
        loop = asyncio.get_running_loop()
        if channel is not self._channel or loop.time() - self._replaced_at < 1.0:
            return
        self._replaced_at = loop.time()
        self.discard()

    async def channel(self, within: float) -> Channel:
        async with self._opening:  # one opener; concurrent publishers then find its channel
            channel = self._channel
            if channel is not None and channel.is_open:
                return channel
            conn = await self._link.up(within)
            channel = await conn.channel()
            await channel.confirm_select()
            self._channel = channel
            return channel

    def watch(self, channel: Channel) -> None:
        """Unconfirmed publishes older than the timeout fail (a stalled broker, a blocked
        connection): one timer for all of them."""
        if self._sweeper is None:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(self._timeout, self._sweep, channel, channel.unconfirmed_mark())

    def channel_now(self) -> Channel | None:
        channel = self._channel
        return channel if channel is not None and channel.is_open else None

    def _sweep(self, channel: Channel, mark: int) -> None:
        self._sweeper = None
        if channel.is_open:
            channel.expire_unconfirmed(mark, TimeoutError(f"no publisher confirm within {self._timeout}s"))
        # A closed channel failed its own unconfirmed publishes; watch whichever is current now.
        current = self._channel
        if current is not None and current.is_open and current.unconfirmed:
            self.watch(current)

    def discard(self) -> None:
        """Stop using the current channel (closed in the background); the next publish opens one."""
        channel, self._channel = self._channel, None
        if channel is not None:
            task = asyncio.get_running_loop().create_task(_close_quietly(channel, self._timeout))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


class RabbitMQTransport(Transport):
    """``url`` is one AMQP URL or several comma-separated ones (nodes of one cluster).

    ``ack_window_s``: how long a consumer's acks may wait for company (other acks, or any
    other frame written on the connection) before going out on their own; 0 sends them at the
    end of the loop turn that asked for them. See :class:`_Acks`.
    """

    def __init__(
        self, url: str, *, connection_name: str = "choreo", timeout: float = 10.0, ack_window_s: float = 0.0
    ) -> None:
        self.url = url
        self.ack_window_s = ack_window_s
        self.urls = amqp_urls(url)
        self.connection_name = connection_name
        self.timeout = timeout
        self._link = _Link(self.urls, connection_name, timeout)
        self._confirms = _Confirms(self._link, timeout)
        self._returns = asyncio.Lock()  # mandatory publishes go one at a time (see _publish_mandatory)
        self._mandatory: _Confirms | None = None
        self._subs: list[_RabbitSubscription] = []
        self._get_channel: Channel | None = None
        self._connected_once = False

    @property
    def connected(self) -> bool:
        return self._connected_once and self._link.connected

    @property
    def connected_url(self) -> str | None:
        """The URL (password masked) of the node the connection uses, or tries next while
        reconnecting."""
        return _redact(self.urls[self._link.at]) if self._connected_once else None

    async def connect(self) -> None:
        """Connect to the first URL that answers, in order; reconnects later rotate from there."""
        await self._link.connect()
        self._connected_once = True

    async def close(self) -> None:
        for sub in self._subs:
            await sub.close()
        self._subs.clear()
        if self._connected_once:
            with contextlib.suppress(TimeoutError, TransportError):
                await self._confirms.close()
                if self._mandatory is not None:
                    await self._mandatory.close()
            await self._link.close()
        self._connected_once = False
        self._get_channel = None
        self._link = _Link(self.urls, self.connection_name, self.timeout)
        self._confirms = _Confirms(self._link, self.timeout)
        self._mandatory = None

    @contextlib.asynccontextmanager
    async def _temp_channel(self) -> AsyncIterator[Channel]:
        """A channel for one operation: a channel error (404, 406) closes it, not a shared one."""
        conn = await self._link.up()
        channel = await conn.channel()
        try:
            yield channel
        finally:
            with contextlib.suppress(TimeoutError, TransportError):
                async with asyncio.timeout(self.timeout):
                    await channel.close()

    async def declare(self, topology: Topology) -> None:
        async with self._temp_channel() as channel:
            try:
                await channel.rpc(
                    Exchange.Declare(exchange=topology.exchange, exchange_type="topic", durable=True),
                    Exchange.DeclareOk,
                )
            except ChannelClosedError as exc:
                if exc.reply_code == 406:
                    raise _topology_error(exc, topology.exchange) from exc
                raise
            for spec in topology.queues:
                try:
                    await channel.rpc(
                        Queue.Declare(queue=spec.name, durable=True, arguments=dict(spec.arguments)), Queue.DeclareOk
                    )
                except ChannelClosedError as exc:
                    if exc.reply_code == 406:
                        raise _topology_error(exc, spec.name) from exc
                    raise
                for key in spec.bindings:
                    await channel.rpc(
                        Queue.Bind(queue=spec.name, exchange=topology.exchange, routing_key=key), Queue.BindOk
                    )

    async def publish(self, message: OutgoingMessage) -> None:
        try:
            properties = encode_properties(
                Properties(
                    content_type="application/json",
                    delivery_mode=2,  # persistent
                    headers=message.headers or None,
                    message_id=message.message_id,
                    correlation_id=message.correlation_id,
                    type=message.type,
                    timestamp=int(time.time()),
                    expiration=str(message.expiration_ms) if message.expiration_ms is not None else None,
                )
            )
        except (TypeError, ValueError, OverflowError, struct.error) as exc:
            raise HeadersNotSendable(f"{message.routing_key!r} not sent: {exc}") from exc
        if message.mandatory:
            await self._publish_mandatory(message, properties)
            return
        # A connection or channel loss is ridden out: wait (bounded) for the connection to come
        # back and publish again. Re-publishing is safe: ids are stable, dedup absorbs copies.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        confirms = self._confirms
        while True:
            channel: Channel | None = None
            try:
                channel = confirms.channel_now()
                if channel is None:
                    channel = await confirms.channel(max(deadline - loop.time(), 0.0))
                waited = not channel.connection.writable_now
                if waited:  # rare: the socket's buffer is full or the broker blocks publishing
                    await _writable(channel.connection, deadline, message)
                confirmed = _send(channel, message, properties)
                confirms.watch(channel)
                if waited:  # what is left of the deadline bounds the confirm too
                    async with asyncio.timeout_at(deadline):
                        await confirmed
                else:
                    await confirmed  # bounded by the confirm sweeper: one timer, not one per publish
                return
            except PublishNotConfirmed:
                raise
            except PublishNackedError as exc:
                if channel is not None:
                    confirms.nacked(channel)
                raise PublishNotConfirmed(f"broker refused {message.routing_key!r}: {exc}") from exc
            except ChannelClosedError as exc:
                missing = _MISSING_EXCHANGE.search(exc.reply_text) if exc.reply_code == 404 else None
                if (missing is not None and missing["name"] == message.exchange) or exc.reply_code in {403, 406}:
                    # Missing exchange, access refused, message too large: trying again cannot help.
                    raise PublishNotConfirmed(f"broker refused {message.routing_key!r}: {exc}") from exc
                if loop.time() >= deadline:
                    raise PublishNotConfirmed(f"publish of {message.routing_key!r} not confirmed: {exc}") from exc
                await asyncio.sleep(0.05)  # the channel is re-opened by the next attempt
            except (TimeoutError, TransportError) as exc:
                if loop.time() >= deadline:
                    raise PublishNotConfirmed(f"publish of {message.routing_key!r} not confirmed: {exc!r}") from exc
                await asyncio.sleep(0.05)  # a channel that failed to open: not in a tight loop

    async def _publish_mandatory(self, message: OutgoingMessage, properties: bytes) -> None:
        """A mandatory publish, alone on its channel: the broker sends a return before the
        confirm of an unroutable message, and with one publish in flight a return on the
        channel can only be this one's. One deadline covers the wait for the lock (other moves
        ahead of it), the channel, a blocked connection and the confirm."""
        deadline = asyncio.get_running_loop().time() + self.timeout
        try:
            async with asyncio.timeout_at(deadline):
                await self._returns.acquire()
        except TimeoutError:
            raise PublishNotConfirmed(
                f"publish of {message.routing_key!r} not sent within {self.timeout}s: earlier moves still wait"
            ) from None
        try:
            if self._mandatory is None:
                self._mandatory = _Confirms(self._link, self.timeout)
            try:
                channel = await self._mandatory.channel(max(deadline - asyncio.get_running_loop().time(), 0.0))
                if not channel.connection.writable_now:
                    await _writable(channel.connection, deadline, message)
                channel.returned.clear()
                confirmed = _send(channel, message, properties)
                async with asyncio.timeout_at(deadline):
                    await confirmed
            except PublishNotConfirmed:
                raise
            except PublishNackedError as exc:
                raise PublishNotConfirmed(f"broker refused {message.routing_key!r}: {exc}") from exc
            except (TimeoutError, TransportError) as exc:
                # A late return from this publish must not be blamed on the next one.
                self._mandatory.discard()
                raise PublishNotConfirmed(f"publish of {message.routing_key!r} not confirmed: {exc!r}") from exc
            if channel.returned:
                raise PublishNotConfirmed(
                    f"unroutable: exchange {message.exchange!r}, routing key {message.routing_key!r}"
                )
        finally:
            self._returns.release()

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
        sub = _RabbitSubscription(self, queue, handler, prefetch)
        try:
            await sub.consume()
        except BaseException as exc:
            await sub.close()  # no restore and no orphaned consumer behind a failed subscribe
            if isinstance(exc, ChannelClosedError) and exc.reply_code == 404:
                raise TransportError(f"queue {queue!r} does not exist: declare the topology first") from exc
            raise
        self._subs.append(sub)
        return sub

    async def _passive_declare(self, queue: str) -> Any | None:
        """The broker's declare-ok for ``queue`` (depth, consumers), or None if it does not
        exist; on a throwaway channel, since a missing queue closes the channel it is asked on."""
        async with self._temp_channel() as channel:
            try:
                return await channel.rpc(Queue.Declare(queue=queue, passive=True), Queue.DeclareOk)
            except ChannelClosedError as exc:
                if exc.reply_code == 404:
                    return None
                raise

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
                await channel.rpc(
                    Queue.Declare(queue=spec.name, durable=True, arguments=dict(spec.arguments)), Queue.DeclareOk
                )
            except ChannelClosedError as exc:
                if exc.reply_code != 406:
                    raise
                drift = dict(_topology_error(exc, spec.name).differences)
        return QueueState(spec.name, True, result.message_count or 0, result.consumer_count or 0, drift)

    async def queue_depth(self, queue: str) -> int:
        result = await self._passive_declare(queue)
        if result is None:
            raise TransportError(f"queue {queue!r} does not exist")
        return int(result.message_count or 0)

    async def get(self, queue: str) -> Delivery | None:
        """basic.get on a channel of its own: a missing queue closes that channel (and is
        reopened next time), never the publishing channel the agents share."""
        try:
            if self._get_channel is None or not self._get_channel.is_open:
                conn = await self._link.up()
                self._get_channel = await conn.channel()
            msg = await self._get_channel.get(queue)  # bounded by the RPC reply timeout
        except ChannelClosedError as exc:
            self._get_channel = None
            if exc.reply_code == 404:
                raise TransportError(f"NOT_FOUND - no queue {queue!r}") from exc
            raise TransportError(f"basic.get on {queue!r} failed: {exc}") from exc
        except (TimeoutError, TransportError) as exc:
            self._get_channel = None
            raise TransportError(f"basic.get on {queue!r} failed: {exc!r}") from exc
        return None if msg is None else _RabbitDelivery(msg)

    async def delete_queue(self, queue: str) -> None:
        async with self._temp_channel() as channel:
            await channel.rpc(Queue.Delete(queue=queue), Queue.DeleteOk)

    async def delete_exchange(self, exchange: str) -> None:
        async with self._temp_channel() as channel:
            await channel.rpc(Exchange.Delete(exchange=exchange), Exchange.DeleteOk)


async def _writable(conn: Connection, deadline: float, message: OutgoingMessage) -> None:
    """Wait until ``conn`` takes publishes again (socket buffer drained, broker not blocking),
    until ``deadline``. Sending while the broker blocks would make it stop reading the
    connection altogether, acks included."""
    try:
        async with asyncio.timeout(max(deadline - asyncio.get_running_loop().time(), 0.0)):
            await conn.writable()
    except TimeoutError:
        if conn.blocked is None:
            raise
        raise PublishNotConfirmed(
            f"publish of {message.routing_key!r} not sent: the broker blocks publishing ({conn.blocked})"
        ) from None


def _send(channel: Channel, message: OutgoingMessage, properties: bytes) -> asyncio.Future[None]:
    """Write ``message`` on ``channel``; the future resolves on the broker's confirm. Raises
    :class:`HeadersNotSendable` (a :class:`PublishNotConfirmed`, which no publish loop retries)
    without writing anything when the headers do not fit in a frame."""
    try:
        data = encode_publish(
            channel.number,
            message.exchange,
            message.routing_key,
            message.body,
            properties,
            mandatory=message.mandatory,
            frame_max=channel.connection.frame_max,
        )
    except HeaderTooLargeError as exc:
        raise HeadersNotSendable(f"{message.routing_key!r} not sent: {exc}") from exc
    return channel.publish(data)


async def _close_quietly(channel: Channel, within: float) -> None:
    with contextlib.suppress(TimeoutError, TransportError):
        async with asyncio.timeout(within):
            await channel.close()


def _redact(url: str) -> str:
    return re.sub(r"//([^:/@]+):([^@]+)@", r"//\1:***@", url)
