"""One AMQP 0-9-1 connection on an :class:`asyncio.Protocol`, and its channels.

- Every socket read is parsed in one pass: deliveries are assembled straight from the receive
  buffer and handed to their consumers once the read is parsed, so a consumer sees a read's
  deliveries together (one loop turn), and its acks go out together.
- Writes made in one loop turn go out as one socket write.
- Synchronous methods (declare, qos, consume, ...) are answered in order on their channel, so
  each channel keeps a queue of waiters. A channel error (``channel.close`` from the broker)
  fails that channel's waiters and unconfirmed publishes with :class:`ChannelClosedError`; a lost
  connection fails everything with :class:`ConnectionClosedError`.
- Heartbeats: one is sent every half interval; a connection that has received nothing for two
  intervals is dropped.

There is no reconnection here: :mod:`choreo.transport.rabbitmq` keeps a connection up.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from ...errors import TransportError
from ..base import RAW_PROPERTIES, UNDECODABLE_PROPERTIES
from . import frames
from .frames import (
    BASIC_ACK,
    BASIC_DELIVER,
    BASIC_NACK,
    FRAME_BODY,
    FRAME_END,
    FRAME_HEAD,
    FRAME_HEADER,
    FRAME_METHOD,
    TAG_BITS,
    U32,
    U64,
    Frame,
    FrameError,
    Properties,
    commands,
    decode_deliver,
    decode_method,
    decode_properties,
)

__all__ = [
    "Channel",
    "ChannelClosedError",
    "Connection",
    "ConnectionClosedError",
    "Endpoint",
    "Message",
    "PublishNackedError",
    "ReplyTimeoutError",
]


Basic, Channel_, Confirm, Connection_, Exchange, Queue = (
    commands.Basic,
    commands.Channel,
    commands.Confirm,
    commands.Connection,
    commands.Exchange,
    commands.Queue,
)


class ConnectionClosedError(TransportError):
    """The connection is gone: lost, refused, or closed by either side."""

    def __init__(self, reason: str, reply_code: int = 0) -> None:
        super().__init__(reason)
        self.reply_code = reply_code


class ChannelClosedError(TransportError):
    """The broker closed a channel (``reply_code`` 404 NOT_FOUND, 406 PRECONDITION_FAILED, ...)."""

    def __init__(self, reply_code: int, reply_text: str) -> None:
        super().__init__(f"channel closed by the broker: {reply_code} {reply_text}")
        self.reply_code = reply_code
        self.reply_text = reply_text


class ReplyTimeoutError(ChannelClosedError):
    """The broker did not answer a synchronous method in time; the channel is given up."""

    def __init__(self, reason: str) -> None:
        super().__init__(0, reason)


class PublishNackedError(TransportError):
    """The broker nacked a publish (it could not take responsibility for it)."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how to connect, from an ``amqp://`` or ``amqps://`` URL.

    Query options: ``heartbeat`` (seconds, default 60), ``frame_max``, ``channel_max``, and for
    TLS ``cafile``, ``certfile``, ``keyfile``, ``no_verify_ssl=1``.
    """

    host: str
    port: int
    user: str
    password: str
    vhost: str
    tls: bool
    heartbeat: int = 60
    frame_max: int = 131072
    channel_max: int = 2047
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    verify: bool = True

    @classmethod
    def from_url(cls, url: str) -> Endpoint:
        parts = urllib.parse.urlsplit(url)
        tls = parts.scheme.lower() == "amqps"
        query = dict(urllib.parse.parse_qsl(parts.query))
        path = urllib.parse.unquote(parts.path[1:]) if parts.path else ""
        return cls(
            host=parts.hostname or "localhost",
            port=parts.port or (5671 if tls else 5672),
            user=urllib.parse.unquote(parts.username or "guest"),
            password=urllib.parse.unquote(parts.password or "guest"),
            vhost=path or "/",
            tls=tls,
            heartbeat=int(query.get("heartbeat", 60)),
            frame_max=int(query.get("frame_max", 131072)),
            channel_max=int(query.get("channel_max", 2047)),
            cafile=query.get("cafile"),
            certfile=query.get("certfile"),
            keyfile=query.get("keyfile"),
            verify=query.get("no_verify_ssl", "0") not in ("1", "true", "yes"),
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        context = ssl.create_default_context(cafile=self.cafile)
        if self.certfile:
            context.load_cert_chain(self.certfile, self.keyfile)
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


class Message:
    """A message from the broker: a delivery, a ``basic.get`` result, or a returned publish."""

    __slots__ = (
        "body",
        "channel",
        "consumer_tag",
        "delivery_tag",
        "exchange",
        "properties",
        "redelivered",
        "routing_key",
    )

    def __init__(  # noqa: PLR0917  (built per delivery: positional is cheaper)
        self,
        channel: Channel,
        consumer_tag: str,
        delivery_tag: int,
        redelivered: bool,
        exchange: str,
        routing_key: str,
    ) -> None:
        self.channel = channel
        self.consumer_tag = consumer_tag
        self.delivery_tag = delivery_tag
        self.redelivered = redelivered
        self.exchange = exchange
        self.routing_key = routing_key
        self.properties: Properties = _NO_PROPERTIES
        self.body = b""


_NO_PROPERTIES = Properties()
Consumer = Callable[[Message], None]
_INCOMING_DELIVERY, _INCOMING_GET, _INCOMING_RETURN, _INCOMING_DISCARD = 0, 1, 2, 3


class Channel:
    """One channel. Methods that wait for the broker raise :class:`ChannelClosedError` or
    :class:`ConnectionClosedError` when the channel or connection goes away meanwhile."""

    def __init__(self, connection: Connection, number: int) -> None:
        self.connection = connection
        self.number = number
        self.closed: TransportError | None = None  # why, once closed
        self.consumers: dict[str, Consumer] = {}
        self.on_cancel: Callable[[str], None] | None = None  # a broker-side basic.cancel
        self.on_close: list[Callable[[TransportError], None]] = []
        self.returned: list[Message] = []  # mandatory publishes the broker returned
        self._rpc: collections.deque[tuple[tuple[type[Frame], ...], asyncio.Future[Any]]] = collections.deque()
        # Once we sent a channel.close, only its close-ok frees the number: a close from the
        # broker crossing ours is answered, and the broker still sends the close-ok for ours.
        self._close_sent = False
        self._incoming: Message | None = None
        self._incoming_kind = _INCOMING_DELIVERY
        self._incoming_left = 0
        self._incoming_parts: list[bytes] = []
        self._ready: list[Message] = []
        # publisher confirms: sequence number -> waiter; sequence numbers are contiguous
        self._confirming = False
        self._next_seq = 1
        self._low_seq = 1
        self._unconfirmed: dict[int, asyncio.Future[None]] = {}

    @property
    def is_open(self) -> bool:
        return self.closed is None

    # -- requests ---------------------------------------------------------------------------

    def _check(self) -> None:
        if self.closed is not None:
            raise self.closed

    def send(self, data: bytes) -> None:
        """Write pre-encoded frames of this channel. Once our close is sent, the broker would
        discard them: that raises instead of passing for sent."""
        self._check()
        if self._close_sent:
            raise TransportError(f"channel {self.number} is closing: frames sent now would be discarded")
        self.connection.write(data)

    async def rpc(self, method: Frame, *expect: type[Frame]) -> Any:
        """Send a synchronous method and wait for its reply (one of ``expect``). Without a
        reply within the connection's ``rpc_timeout`` the channel is given up
        (:class:`ReplyTimeoutError`): later replies could no longer be matched to requests."""
        self._check()
        future: asyncio.Future[Any] = self.connection.loop.create_future()
        self._rpc.append((expect, future))
        self.connection.write(frames.encode_method(self.number, method))
        if isinstance(method, Channel_.Close):
            self._close_sent = True
        within = self.connection.rpc_timeout
        try:
            async with asyncio.timeout(within):
                return await future
        except TimeoutError:
            reason = f"no reply to {type(method).__name__} within {within}s"
            self._abandon(reason, send_close=not isinstance(method, Channel_.Close))
            raise ReplyTimeoutError(reason) from None
        except asyncio.CancelledError:
            # The reply will still come, and nobody will take it: give the channel up.
            self._abandon(
                f"{type(method).__name__} cancelled before its reply", send_close=not isinstance(method, Channel_.Close)
            )
            raise

    def _abandon(self, reason: str, *, send_close: bool = True) -> None:
        """Close the channel on our side at once; its number stays taken until the broker
        confirms the close, so that a new channel never receives this one's late frames."""
        if self.closed is not None:
            return
        self._closed(ReplyTimeoutError(reason), forget=False)
        if not send_close or self._close_sent:  # a close is on its way already; its close-ok frees the number
            return
        with contextlib.suppress(TransportError):
            self.connection.write(
                frames.encode_method(
                    self.number, Channel_.Close(reply_code=200, reply_text=reason, class_id=0, method_id=0)
                )
            )
            self._close_sent = True

    async def qos(self, prefetch_count: int) -> None:
        await self.rpc(Basic.Qos(prefetch_count=prefetch_count), Basic.QosOk)

    async def consume(self, queue: str, tag: str, consumer: Consumer) -> None:
        """Deliveries start once the broker has the consumer; ``consumer`` is called for each
        one, in order, synchronously from the read that completed it."""
        self.consumers[tag] = consumer
        try:
            await self.rpc(Basic.Consume(queue=queue, consumer_tag=tag), Basic.ConsumeOk)
        except BaseException:
            self.consumers.pop(tag, None)
            raise

    async def cancel(self, tag: str) -> None:
        await self.rpc(Basic.Cancel(consumer_tag=tag), Basic.CancelOk)
        self.consumers.pop(tag, None)

    async def get(self, queue: str) -> Message | None:
        """``basic.get``: the message (unacked), or None if the queue is empty."""
        result = await self.rpc(Basic.Get(queue=queue), Basic.GetOk, Basic.GetEmpty)
        return result if isinstance(result, Message) else None

    async def confirm_select(self) -> None:
        await self.rpc(Confirm.Select(), Confirm.SelectOk)
        self._confirming = True

    def publish(self, frames_: bytes) -> asyncio.Future[None]:
        """Write one pre-encoded publish (:func:`frames.encode_publish` for this channel); on a
        confirming channel the future resolves on the broker's ack and fails with
        :class:`PublishNackedError` on its nack."""
        self._check()
        future = self.connection.loop.create_future()
        if self._confirming:
            self._unconfirmed[self._next_seq] = future
            self._next_seq += 1
        else:
            future.set_result(None)
        self.connection.write(frames_)
        return future

    @property
    def unconfirmed(self) -> int:
        return len(self._unconfirmed)

    def unconfirmed_mark(self) -> int:
        """The sequence number of the last publish written so far."""
        return self._next_seq - 1

    def expire_unconfirmed(self, mark: int, exc: BaseException) -> None:
        """Fail the unconfirmed publishes up to ``mark`` with ``exc`` (the broker's confirm for
        them, if it ever comes, is then ignored)."""
        pending = self._unconfirmed
        for seq in range(self._low_seq, mark + 1):
            future = pending.pop(seq, None)
            if future is not None and not future.done():
                future.set_exception(exc)
        self._low_seq = max(self._low_seq, mark + 1)

    def fail_unconfirmed(self, exc: BaseException) -> None:
        """Give up on every publish not confirmed yet (their waiters get ``exc``)."""
        pending, self._unconfirmed = self._unconfirmed, {}
        self._low_seq = self._next_seq
        for future in pending.values():
            if not future.done():
                future.set_exception(exc)

    async def close(self) -> None:
        if self.closed is not None or self._close_sent:  # closed, or a close is on its way
            return
        with contextlib.suppress(TransportError):
            await self.rpc(
                Channel_.Close(reply_code=200, reply_text="Normal shutdown", class_id=0, method_id=0), Channel_.CloseOk
            )
        self._closed(ChannelClosedError(200, "closed by the client"))

    # -- from the broker --------------------------------------------------------------------

    def _on_confirm(self, tag: int, multiple: bool, ok: bool) -> None:
        pending = self._unconfirmed
        if multiple:
            futures = [f for seq in range(self._low_seq, tag + 1) if (f := pending.pop(seq, None)) is not None]
            self._low_seq = max(self._low_seq, tag + 1)
        else:
            single = pending.pop(tag, None)
            futures = [single] if single is not None else []
            low = self._low_seq
            while low < self._next_seq and low not in pending:
                low += 1
            self._low_seq = low
        for future in futures:
            if future.done():
                continue
            if ok:
                future.set_result(None)
            else:
                future.set_exception(PublishNackedError("the broker nacked the publish"))

    def _on_content_method(self, message: Message, kind: int) -> None:
        self._incoming = message
        self._incoming_kind = kind

    def _on_header(self, size: int, properties: Properties) -> None:
        message = self._incoming
        if message is None:
            raise FrameError("content header without a method")
        message.properties = properties
        if size == 0:
            self._complete(message)
        else:
            self._incoming_left = size
            self._incoming_parts = []

    def _on_body(self, chunk: bytes) -> None:
        message = self._incoming
        if message is None:
            raise FrameError("content body without a method")
        left = self._incoming_left - len(chunk)
        if left == 0 and not self._incoming_parts:
            message.body = chunk
        else:
            self._incoming_parts.append(chunk)
            if left > 0:
                self._incoming_left = left
                return
            if left < 0:
                raise FrameError("content body longer than its header said")
            message.body = b"".join(self._incoming_parts)
            self._incoming_parts = []
        self._complete(message)

    def _complete(self, message: Message) -> None:
        self._incoming = None
        kind = self._incoming_kind
        if kind == _INCOMING_DELIVERY:
            self._ready.append(message)
        elif kind == _INCOMING_GET:
            self._reply(message, Basic.GetOk)
        elif kind == _INCOMING_RETURN:
            self.returned.append(message)
        # _INCOMING_DISCARD: content for an abandoned channel; the broker requeues it on close

    def _hand_out(self) -> None:
        """Give the deliveries completed by the last read to their consumers."""
        ready, self._ready = self._ready, []
        consumers = self.consumers
        for message in ready:
            consumer = consumers.get(message.consumer_tag)
            if consumer is not None:
                consumer(message)
            elif self.closed is None:
                # No consumer for it any more: give it back now. Left unacked, a later
                # multiple ack on this channel would settle it without it being handled.
                self.connection.write(frames.encode_nack(self.number, message.delivery_tag, requeue=True))

    def _reply(self, value: Any, kind: type[Frame]) -> None:
        if not self._rpc:
            raise FrameError(f"unexpected {kind.__name__} on channel {self.number}")
        expect, future = self._rpc.popleft()
        if kind not in expect:
            raise FrameError(f"expected {' or '.join(e.__name__ for e in expect)}, got {kind.__name__}")
        if not future.done():
            future.set_result(value)

    def _on_method(self, method: Frame) -> None:
        if self.closed is not None:  # abandoned: only its close matters now
            if isinstance(method, Channel_.Close):
                self.connection.write(frames.encode_method(self.number, Channel_.CloseOk()))
                if not self._close_sent:
                    self.connection._forget(self)
            elif isinstance(method, Channel_.CloseOk):
                self.connection._forget(self)
            elif isinstance(method, Basic.GetOk | Basic.Return):  # its content follows: skip it
                self._on_content_method(Message(self, "", 0, False, "", ""), _INCOMING_DISCARD)
            return
        if isinstance(method, Basic.Cancel | Channel_.Close):
            self._hand_out()  # deliveries that came before it in this read still reach the consumer
        if isinstance(method, Channel_.Close):
            self.connection.write(frames.encode_method(self.number, Channel_.CloseOk()))
            # Crossing our own close: the number stays taken until that close's close-ok.
            self._closed(ChannelClosedError(method.reply_code or 0, method.reply_text), forget=not self._close_sent)
        elif isinstance(method, Basic.GetOk):
            message = Message(
                self, "", method.delivery_tag or 0, method.redelivered, method.exchange, method.routing_key or ""
            )
            self._on_content_method(message, _INCOMING_GET)
        elif isinstance(method, Basic.Return):
            message = Message(self, "", 0, False, method.exchange, method.routing_key or "")
            self._on_content_method(message, _INCOMING_RETURN)
        elif isinstance(method, Basic.Cancel):  # the broker cancelled a consumer (queue deleted, ...)
            tag = method.consumer_tag or ""
            self.consumers.pop(tag, None)
            if not method.nowait:
                self.connection.write(frames.encode_method(self.number, Basic.CancelOk(consumer_tag=tag)))
            if self.on_cancel is not None:
                self.on_cancel(tag)
        elif isinstance(method, Channel_.Flow):
            self.connection.write(frames.encode_method(self.number, Channel_.FlowOk(active=method.active)))
        else:
            self._reply(method, type(method))
            if isinstance(method, Channel_.CloseOk):
                self._closed(ChannelClosedError(200, "closed by the client"))

    def _closed(self, exc: TransportError, *, forget: bool = True) -> None:
        if self.closed is not None:
            return
        self.closed = exc
        self.consumers.clear()
        if forget:
            self.connection._forget(self)
        waiters, self._rpc = self._rpc, collections.deque()
        for _, future in waiters:
            if not future.done():
                future.set_exception(exc)
        self.fail_unconfirmed(exc)
        for callback in list(self.on_close):
            callback(exc)


class Connection(asyncio.Protocol):
    """An open AMQP connection (see the module docstring). Create with :meth:`open`."""

    def __init__(self, endpoint: Endpoint, name: str) -> None:
        self.endpoint = endpoint
        self.name = name
        self.loop = asyncio.get_running_loop()
        self.closed: TransportError | None = None
        self.on_lost: Callable[[TransportError], None] | None = None
        self.server_properties: dict[str, Any] = {}
        self.frame_max = endpoint.frame_max
        self.channel_max = endpoint.channel_max
        self.heartbeat = endpoint.heartbeat
        self.rpc_timeout = 10.0
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._channels: dict[int, Channel] = {}
        self._next_number = 1
        self._ch0: collections.deque[tuple[tuple[type[Frame], ...], asyncio.Future[Any]]] = collections.deque()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._riders: list[Callable[[], None]] = []
        # Publishes wait while either holds: the socket's buffer is full (pause_writing), or the
        # broker blocked publishing (a resource alarm; the reason is kept in ``blocked``).
        self._writable = asyncio.Event()
        self._writable.set()
        self._paused = False
        self.blocked: str | None = None
        self.on_blocked: Callable[[str | None], None] | None = None
        self._heard = True
        self._silent_ticks = 0
        self._heartbeat_timer: asyncio.TimerHandle | None = None

    # -- opening and closing --------------------------------------------------------------------

    @classmethod
    async def open(cls, endpoint: Endpoint, *, name: str, within: float) -> Connection:
        """Connect, authenticate and open the vhost within ``within`` seconds."""
        conn = cls(endpoint, name)
        try:
            async with asyncio.timeout(within):
                await conn._handshake()
        except BaseException as exc:
            conn.abort()
            if isinstance(exc, TimeoutError):
                raise ConnectionClosedError(f"no answer within {within}s") from exc
            if isinstance(exc, OSError):
                raise ConnectionClosedError(f"{exc.strerror or exc!r}") from exc
            raise
        return conn

    async def _handshake(self) -> None:
        ep = self.endpoint
        await self.loop.create_connection(
            lambda: self, ep.host, ep.port, ssl=ep.ssl_context(), server_hostname=ep.host if ep.tls else None
        )
        start = self._expect0(Connection_.Start)
        self._write_now(frames.PROTOCOL_HEADER)
        started: Any = await start
        self.server_properties = dict(started.server_properties or {})
        tune = self._expect0(Connection_.Tune)
        self._write_now(
            frames.encode_method(
                0,
                Connection_.StartOk(
                    client_properties={
                        "product": "choreo",
                        "platform": "Python",
                        "connection_name": self.name,
                        "capabilities": {
                            "publisher_confirms": True,
                            "consumer_cancel_notify": True,
                            "basic.nack": True,
                            "connection.blocked": True,
                            "authentication_failure_close": True,
                            "exchange_exchange_bindings": True,
                            "per_consumer_qos": True,
                        },
                    },
                    mechanism="PLAIN",
                    response=f"\0{ep.user}\0{ep.password}",
                ),
            )
        )
        tuned: Any = await tune
        self.channel_max = _negotiate(ep.channel_max, tuned.channel_max) or 2047
        self.frame_max = _negotiate(ep.frame_max, tuned.frame_max) or 131072
        # Either side may turn heartbeats off with 0; otherwise the smaller interval wins.
        self.heartbeat = min(ep.heartbeat, tuned.heartbeat) if ep.heartbeat and tuned.heartbeat else 0
        opened = self._expect0(Connection_.OpenOk)
        self._write_now(
            frames.encode_method(
                0, Connection_.TuneOk(channel_max=self.channel_max, frame_max=self.frame_max, heartbeat=self.heartbeat)
            )
            + frames.encode_method(0, Connection_.Open(virtual_host=ep.vhost))
        )
        await opened
        if self.heartbeat:
            self._heartbeat_timer = self.loop.call_later(self.heartbeat / 2, self._heartbeat_tick)

    def _expect0(self, *kinds: type[Frame]) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self.loop.create_future()
        self._ch0.append((kinds, future))
        return future

    async def close(self, grace: float = 5.0) -> None:
        """Close politely (``connection.close``, waiting for the broker's close-ok), then drop."""
        if self.closed is not None:
            return
        try:
            done = self._expect0(Connection_.CloseOk)
            self.write(
                frames.encode_method(
                    0, Connection_.Close(reply_code=200, reply_text="Normal shutdown", class_id=0, method_id=0)
                )
            )
            async with asyncio.timeout(grace):
                await done
        except (TimeoutError, TransportError):
            pass
        self._lost(ConnectionClosedError("closed by the client", 200))
        self.abort()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    @property
    def is_open(self) -> bool:
        return self.closed is None

    # -- channels ---------------------------------------------------------------------------

    async def channel(self) -> Channel:
        if self.closed is not None:
            raise self.closed
        number = self._next_number
        for _ in range(self.channel_max):
            if number > self.channel_max:
                number = 1
            if number not in self._channels:
                break
            number += 1
        else:
            raise TransportError(f"all {self.channel_max} channels of the connection are in use")
        self._next_number = number + 1
        channel = self._channels[number] = Channel(self, number)
        try:
            await channel.rpc(Channel_.Open(), Channel_.OpenOk)
        except BaseException:
            if channel.closed is None:  # a given-up channel keeps its number until closed
                self._channels.pop(number, None)
            raise
        return channel

    def _forget(self, channel: Channel) -> None:
        if self._channels.get(channel.number) is channel:
            del self._channels[channel.number]

    # -- writing ----------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queue ``data``; everything queued in one loop turn goes out as one write."""
        if self.closed is not None:
            raise self.closed
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def before_next_write(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` (once) just before the next write of queued frames, so that frames
        it is holding back (acks waiting for company) share that write instead of a syscall and
        a broker wake-up of their own. What it writes goes after what is already queued, so the
        frames of one channel keep their order (an ack for tag 9 must not overtake a queued
        ``multiple`` ack up to tag 5: the broker would close the channel for acking 5 twice).
        It may call :meth:`write`; it must not raise."""
        self._riders.append(callback)

    def _flush(self) -> None:
        if self._riders:
            # Before the flag is cleared: what the riders write joins this write, not a new one.
            riders, self._riders = self._riders, []
            for rider in riders:
                try:
                    rider()
                except Exception as exc:  # one rider's bug must not stop this connection's writes
                    self.loop.call_exception_handler({"message": "frame rider failed", "exception": exc})
        self._flush_scheduled = False
        out, self._out = self._out, []
        if self._transport is not None and self.closed is None and out:
            self._transport.write(b"".join(out) if len(out) > 1 else out[0])

    def _write_now(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.write(data)

    @property
    def writable_now(self) -> bool:
        return self._writable.is_set()

    async def writable(self) -> None:
        """Returns once a publish may be written: the socket's write buffer is below its
        high-water mark and the broker does not block publishing (``connection.blocked``).
        Other frames (acks, heartbeats) are never held back."""
        if not self._writable.is_set():
            await self._writable.wait()

    def _update_writable(self) -> None:
        if self.closed is not None or (not self._paused and self.blocked is None):
            self._writable.set()
        else:
            self._writable.clear()

    def pause_writing(self) -> None:
        self._paused = True
        self._update_writable()

    def resume_writing(self) -> None:
        self._paused = False
        self._update_writable()

    # -- reading ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(ConnectionClosedError(f"connection lost: {exc!r}" if exc else "connection closed by the broker"))

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def data_received(self, data: bytes) -> None:
        self._heard = True
        buf = self._buf
        buf += data
        size_now = len(buf)
        pos = 0
        channels = self._channels
        try:
            while size_now - pos >= 8:
                kind, number, size = FRAME_HEAD.unpack_from(buf, pos)
                end = pos + 7 + size
                if end >= size_now:
                    break
                if buf[end] != FRAME_END:
                    raise FrameError("frame does not end with 0xCE")
                start = pos + 7
                channel = channels.get(number)
                if kind == FRAME_BODY:
                    if channel is not None:
                        channel._on_body(bytes(buf[start:end]))
                elif kind == FRAME_METHOD:
                    (ids,) = U32.unpack_from(buf, start)
                    if channel is None:
                        if number == 0:
                            self._on_method0(decode_method(bytes(buf[pos : end + 1])))
                        # else: a late frame for a channel closed here; nothing waits for it
                    elif ids == BASIC_DELIVER:
                        ctag, tag, redelivered, exchange, rk = decode_deliver(buf, start + 4)
                        channel._incoming = Message(channel, ctag, tag, redelivered, exchange, rk)
                        channel._incoming_kind = _INCOMING_DELIVERY
                    elif ids in {BASIC_ACK, BASIC_NACK}:
                        tag, bits = TAG_BITS.unpack_from(buf, start + 4)
                        channel._on_confirm(tag, bool(bits & 1), ids == BASIC_ACK)
                    else:
                        # includes basic.get-ok and basic.return, whose content follows
                        channel._on_method(decode_method(bytes(buf[pos : end + 1])))
                elif kind == FRAME_HEADER:
                    if channel is not None:
                        (body_size,) = U64.unpack_from(buf, start + 4)
                        try:
                            properties = decode_properties(buf, start + 12)
                        except Exception as exc:  # the frame is whole; only its content is odd
                            properties = _undecodable(exc, bytes(buf[start + 12 : end]))
                        channel._on_header(body_size, properties)
                elif kind != frames.FRAME_HEARTBEAT:
                    raise FrameError(f"unknown frame type {kind}")
                pos = end + 1
        except Exception as exc:  # raised out of here, it would kill the reader
            # The stream cannot be trusted past a bad frame: drop the connection (and
            # with it every unacked delivery, which the broker requeues).
            self._lost(ConnectionClosedError(f"malformed frame from the broker: {exc}"))
            self.abort()
            return
        del buf[:pos]
        for channel in list(channels.values()):  # a handful per connection
            if channel._ready:
                channel._hand_out()

    def _on_method0(self, method: Frame) -> None:
        if isinstance(method, Connection_.Close):
            with contextlib.suppress(Exception):
                self._write_now(frames.encode_method(0, Connection_.CloseOk()))
            code = method.reply_code or 0
            self._lost(ConnectionClosedError(f"closed by the broker: {code} {method.reply_text}", code))
            self.abort()
        elif isinstance(method, Connection_.Blocked | Connection_.Unblocked):
            # A resource alarm. Holding publishes back keeps the broker reading this connection
            # (it stops reading only once a blocked connection publishes), so acks still flow.
            self.blocked = (method.reason or "resource alarm") if isinstance(method, Connection_.Blocked) else None
            self._update_writable()
            if self.on_blocked is not None:
                self.on_blocked(self.blocked)
        elif self._ch0:
            kinds, future = self._ch0.popleft()
            if not future.done():
                if isinstance(method, kinds):
                    future.set_result(method)
                else:
                    future.set_exception(FrameError(f"unexpected {type(method).__name__} during the handshake"))

    def _heartbeat_tick(self) -> None:
        if self.closed is not None:
            return
        if self._heard:
            self._heard, self._silent_ticks = False, 0
        else:
            self._silent_ticks += 1
            if self._silent_ticks >= 4:  # two whole intervals without a byte
                self._lost(ConnectionClosedError(f"no heartbeat from the broker for {2 * self.heartbeat}s"))
                self.abort()
                return
        if self._transport is not None:
            self._transport.write(frames.HEARTBEAT)
        self._heartbeat_timer = self.loop.call_later(self.heartbeat / 2, self._heartbeat_tick)

    def _lost(self, exc: TransportError) -> None:
        if self.closed is not None:
            return
        self.closed = exc
        self._writable.set()  # nobody waits to write on a dead connection
        if self._heartbeat_timer is not None:
            self._heartbeat_timer.cancel()
        waiters, self._ch0 = self._ch0, collections.deque()
        for _, future in waiters:
            if not future.done():
                future.set_exception(exc)
        for channel in list(self._channels.values()):
            channel._closed(exc)
        if self.on_lost is not None:
            self.on_lost(exc)


def _undecodable(exc: Exception, raw: bytes) -> Properties:
    """Properties standing in for ones that could not be decoded (a non-UTF-8 short string, a
    value out of range...): the message goes on to be dead-lettered, not the connection down
    with it, which would only bring the message back, again and again."""
    why = f"{type(exc).__name__}: {exc}"[:300]
    return Properties(headers={UNDECODABLE_PROPERTIES: why, RAW_PROPERTIES: raw})


def _negotiate(ours: int, theirs: int) -> int:
    """The smaller of two limits where 0 means "no limit"."""
    if ours and theirs:
        return min(ours, theirs)
    return ours or theirs
