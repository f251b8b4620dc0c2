"""choreo's hand-written AMQP codecs against pamqp (the reference), and the connection's frame
parser fed from a fake socket: deliveries split across reads at every byte, several in one read."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import decimal
from typing import Any

import pamqp.body
import pamqp.commands as cmd
import pamqp.frame
import pamqp.header
import pytest

from choreo.transport.amqp import frames
from choreo.transport.amqp.connection import (
    Channel,
    Connection,
    ConnectionClosedError,
    Endpoint,
    Message,
    ReplyTimeoutError,
)
from choreo.transport.base import RAW_PROPERTIES, UNDECODABLE_PROPERTIES

NOW = datetime.datetime(2026, 11, 21, 12, 0, 0, tzinfo=datetime.UTC)

HEADERS: dict[str, Any] = {
    "x-choreo-signature": "v1=" + "ab" * 32,
    "x-choreo-key-id": "k1",
    "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01",
    "small": 5,
    "negative": -40000,
    "big": 2**40,
    "flag": True,
    "off": False,
    "nothing": None,
    "double": 0.1,
    "nested": {"count": 3, "reason": "rejected", "time": NOW, "queues": ["a", "b"]},
    "x-death": [{"count": 1, "exchange": "", "routing-keys": ["q"]}],
    "price": decimal.Decimal("12.34"),
    "ünïcode": "välue",
}


def pamqp_properties(**kwargs: Any) -> cmd.Basic.Properties:
    return cmd.Basic.Properties(**kwargs)


def header_frame(body_size: int, props: cmd.Basic.Properties, channel: int = 1) -> bytes:
    return pamqp.frame.marshal(pamqp.header.ContentHeader(0, body_size, props), channel)


def fields(props: frames.Properties) -> dict[str, Any]:
    return {name: getattr(props, name) for name in frames.Properties.__slots__}


def test_tables_decode_as_pamqp_decodes_them() -> None:
    # pamqp writes floats as 32-bit: compare those separately.
    table = {k: v for k, v in HEADERS.items() if k != "double"}
    encoded = pamqp.encode.field_table(table)
    decoded, end = frames.decode_table(encoded, 0)
    assert end == len(encoded)
    assert decoded == pamqp.decode.field_table(encoded)[1]
    assert decoded["nested"]["time"] == NOW
    assert decoded["price"] == decimal.Decimal("12.34")


def test_tables_encode_byte_for_byte_as_pamqp_except_floats_which_stay_doubles() -> None:
    table = {k: v for k, v in HEADERS.items() if k != "double"}
    assert frames.encode_table(table) == pamqp.encode.field_table(table)
    decoded, _ = frames.decode_table(frames.encode_table({"double": 0.1}), 0)
    assert decoded == {"double": 0.1}  # exact: a 32-bit float would read back 0.10000000149...


def test_tables_with_more_header_names_than_are_kept_still_encode_as_pamqp() -> None:
    """Encoded header names are kept for reuse, but only up to a bound: names past it (any
    sender can make them up) are encoded each time, the same bytes either way."""
    for start in range(0, 3 * frames._NAMES_KEPT, 100):
        table = {f"x-made-up-{i}": f"v{i}" for i in range(start, start + 100)}
        assert frames.encode_table(table) == pamqp.encode.field_table(table)
    assert len(frames._NAMES) <= frames._NAMES_KEPT
    table = {"x-made-up-0": "again", "x-made-up-2999": 7}  # kept and not kept, reused
    assert frames.encode_table(table) == pamqp.encode.field_table(table)


@pytest.mark.parametrize(
    "props",
    [
        frames.Properties(headers={"k" * 256: "v"}),
        frames.Properties(headers={"é" * 128: "v"}),  # 256 bytes in UTF-8
        frames.Properties(message_id="m" * 256),
        frames.Properties(correlation_id="c" * 300),
        frames.Properties(type="é" * 200),
    ],
    ids=["header-name", "header-name-utf8", "message-id", "correlation-id", "type-utf8"],
)
def test_short_strings_past_255_bytes_are_refused(props: frames.Properties) -> None:
    with pytest.raises(TypeError, match="longer than 255 bytes"):
        frames.encode_properties(props)


def test_a_long_string_that_is_not_utf8_decodes_to_bytes() -> None:
    raw = b"\x00\x00\x00\x0a\x01kS\x00\x00\x00\x03\xff\xfe\x01"
    assert frames.decode_table(raw, 0)[0] == {"k": b"\xff\xfe\x01"}


@pytest.mark.parametrize(
    "raw",
    [
        b"\x00\x00\x00\x20\x01k",  # length runs past the buffer
        b"\x00\x00\x00\x03\x01kQ",  # unknown field type
        b"\x00\x00\x00\x09\x01kS\x00\x00\x00\x09ab",  # string runs past its table
    ],
)
def test_malformed_tables_raise_frame_errors(raw: bytes) -> None:
    with pytest.raises((frames.FrameError, IndexError)):
        frames.decode_table(raw, 0)


FULL = {
    "content_type": "application/json",
    "content_encoding": "identity",
    "headers": {k: v for k, v in HEADERS.items() if k != "double"},
    "delivery_mode": 2,
    "priority": 3,
    "correlation_id": "corr-1",
    "reply_to": "replies",
    "expiration": "60000",
    "message_id": "0193-abc",
    "timestamp": NOW,
    "message_type": "order.placed",
    "user_id": "guest",
    "app_id": "shop",
}


@pytest.mark.parametrize(
    "given",
    [
        FULL,
        {},
        {"content_type": "application/json", "delivery_mode": 2, "message_id": "m"},
        {"headers": {}, "timestamp": NOW},
    ],
    ids=["all", "none", "some", "empty-headers"],
)
def test_properties_decode_and_encode_as_pamqp(given: dict[str, Any]) -> None:
    raw = header_frame(10, pamqp_properties(**given))
    props = frames.decode_properties(raw, 7 + 12)
    expected = dict.fromkeys(frames.Properties.__slots__)
    for key, value in given.items():
        name = {"message_type": "type"}.get(key, key)
        expected[name] = int(value.timestamp()) if key == "timestamp" else value
    assert fields(props) == expected
    assert frames.encode_properties(props) == raw[7 + 12 : -1]


def test_publish_frames_read_back_with_pamqp_and_split_the_body_at_frame_max() -> None:
    props = frames.encode_properties(frames.Properties(content_type="application/json", delivery_mode=2))
    body = bytes(range(256)) * 10
    data = frames.encode_publish(5, "ex", "a.b", body, props, mandatory=True, frame_max=1000)
    seen = []
    while data:
        used, channel, value = pamqp.frame.unmarshal(data)
        assert channel == 5
        seen.append(value)
        data = data[used:]
    publish, header, *chunks = seen
    assert isinstance(publish, cmd.Basic.Publish)
    assert (publish.exchange, publish.routing_key, publish.mandatory) == ("ex", "a.b", True)
    assert isinstance(header, pamqp.header.ContentHeader)
    assert header.body_size == len(body)
    assert header.properties.content_type == "application/json"
    assert all(isinstance(c, pamqp.body.ContentBody) for c in chunks)
    assert [len(c.value) for c in chunks] == [992, 992, 576]
    assert b"".join(c.value for c in chunks) == body


def test_ack_and_nack_frames_read_back_with_pamqp() -> None:
    _, channel, ack = pamqp.frame.unmarshal(frames.encode_ack(3, 2**40, multiple=True))
    assert channel == 3
    assert isinstance(ack, cmd.Basic.Ack)
    assert (ack.delivery_tag, ack.multiple) == (2**40, True)
    _, _, nack = pamqp.frame.unmarshal(frames.encode_nack(3, 7, requeue=False))
    assert isinstance(nack, cmd.Basic.Nack)
    assert (nack.delivery_tag, nack.multiple, nack.requeue) == (7, False, False)


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def abort(self) -> None:
        self.aborted = True


def delivery_bytes(channel: int, tag: int, body: bytes, *, frame_max: int = 131072) -> bytes:
    deliver = cmd.Basic.Deliver(
        consumer_tag="ctag", delivery_tag=tag, redelivered=tag % 2 == 0, exchange="ex", routing_key="a.b"
    )
    props = pamqp_properties(content_type="application/json", headers={"n": tag}, message_id=f"m{tag}")
    out = pamqp.frame.marshal(deliver, channel) + header_frame(len(body), props, channel)
    for start in range(0, len(body), frame_max - 8):
        out += pamqp.frame.marshal(pamqp.body.ContentBody(body[start : start + frame_max - 8]), channel)
    return out


async def connected() -> tuple[Connection, Channel, list[list[Message]]]:
    conn = Connection(Endpoint.from_url("amqp://guest:guest@localhost/"), "test")
    conn.connection_made(FakeTransport())  # type: ignore[arg-type]
    channel = Channel(conn, 1)
    conn._channels[1] = channel
    batches: list[list[Message]] = []

    def consumer(message: Message) -> None:
        batches[-1].append(message)

    real_hand_out = channel._hand_out

    def hand_out() -> None:  # one batch per read
        batches.append([])
        real_hand_out()

    channel._hand_out = hand_out  # type: ignore[method-assign]
    channel.consumers["ctag"] = consumer
    return conn, channel, batches


async def test_a_read_with_many_deliveries_hands_them_over_together_in_order() -> None:
    conn, _, batches = await connected()
    stream = b"".join(delivery_bytes(1, tag, f"body-{tag}".encode()) for tag in range(1, 51))
    conn.data_received(stream)
    assert len(batches) == 1
    got = batches[0]
    assert [m.delivery_tag for m in got] == list(range(1, 51))
    assert [m.body for m in got] == [f"body-{t}".encode() for t in range(1, 51)]
    assert got[1].redelivered
    assert not got[0].redelivered
    assert (got[0].exchange, got[0].routing_key, got[0].consumer_tag) == ("ex", "a.b", "ctag")
    assert got[4].properties.headers == {"n": 5}
    assert got[4].properties.message_id == "m5"


@pytest.mark.parametrize("piece", [1, 7, 13, 100])
async def test_deliveries_split_anywhere_across_reads_come_out_whole(piece: int) -> None:
    conn, _, batches = await connected()
    body = bytes(range(256)) * 20  # three body frames at frame_max 2048
    stream = delivery_bytes(1, 1, body, frame_max=2048) + delivery_bytes(1, 2, b"", frame_max=2048)
    for start in range(0, len(stream), piece):
        conn.data_received(stream[start : start + piece])
    got = [m for batch in batches for m in batch]
    assert [(m.delivery_tag, m.body) for m in got] == [(1, body), (2, b"")]
    assert not conn._buf


async def test_a_frame_without_its_end_byte_drops_the_connection_and_fails_waiters() -> None:
    conn, channel, _ = await connected()
    waiter = asyncio.ensure_future(channel.qos(10))
    await asyncio.sleep(0)
    bad = bytearray(delivery_bytes(1, 1, b"x"))
    bad[-1] = 0
    conn.data_received(bytes(bad))
    assert isinstance(conn.closed, ConnectionClosedError)
    assert "malformed" in str(conn.closed)
    with pytest.raises(ConnectionClosedError):
        await waiter
    assert not channel.is_open


async def test_confirms_resolve_singly_and_multiply_and_nacks_fail() -> None:
    conn, channel, _ = await connected()
    channel._confirming = True
    futures = [channel.publish(b"") for _ in range(6)]
    conn.data_received(pamqp.frame.marshal(cmd.Basic.Ack(delivery_tag=2), 1))
    assert [f.done() for f in futures] == [False, True, False, False, False, False]
    conn.data_received(
        pamqp.frame.marshal(cmd.Basic.Ack(delivery_tag=4, multiple=True), 1)
        + pamqp.frame.marshal(cmd.Basic.Nack(delivery_tag=5), 1)
    )
    assert [f.done() for f in futures] == [True, True, True, True, True, False]
    assert isinstance(futures[4].exception(), Exception)
    assert channel.unconfirmed == 1
    channel.expire_unconfirmed(channel.unconfirmed_mark(), TimeoutError("late"))
    assert isinstance(futures[5].exception(), TimeoutError)


async def test_an_unanswered_request_gives_the_channel_up_but_keeps_its_number_until_closed() -> None:
    conn, channel, _ = await connected()
    conn.rpc_timeout = 0.05
    with pytest.raises(ReplyTimeoutError, match="Qos"):
        await channel.qos(10)
    assert not channel.is_open
    assert conn._channels[1] is channel  # a new channel 1 could get this one's late reply
    conn.data_received(pamqp.frame.marshal(cmd.Basic.QosOk(), 1))  # the late reply is ignored
    assert conn.is_open
    conn.data_received(pamqp.frame.marshal(cmd.Channel.CloseOk(), 1))
    assert 1 not in conn._channels


def broker_close(code: int, text: str) -> bytes:
    return pamqp.frame.marshal(cmd.Channel.Close(reply_code=code, reply_text=text, class_id=50, method_id=10), 1)


async def test_a_broker_close_crossing_ours_keeps_the_number_until_our_close_ok() -> None:
    """Both sides close at once: we answer the broker's close, and its close-ok for ours is
    still on the way; a new channel given the number now would take that close-ok as its reply."""
    conn, channel, _ = await connected()
    closing = asyncio.ensure_future(channel.close())
    await asyncio.sleep(0)  # our channel.close is written
    conn.data_received(broker_close(404, "NOT_FOUND"))
    await closing  # the broker's close ends our close() too
    assert not channel.is_open
    assert conn._channels[1] is channel
    await asyncio.sleep(0)  # writes of this turn go out in the next
    assert written_methods(conn) == [cmd.Channel.Close, cmd.Channel.CloseOk]  # ours, then the answer to theirs
    conn.data_received(pamqp.frame.marshal(cmd.Channel.CloseOk(), 1))
    assert 1 not in conn._channels
    assert conn.is_open


def written_methods(conn: Connection) -> list[type]:
    """The classes of the method frames written so far."""
    data = b"".join(conn._transport.written)  # type: ignore[union-attr]
    methods: list[type] = []
    while data:
        consumed, _channel, frame = pamqp.frame.unmarshal(data)
        data = data[consumed:]
        methods.append(type(frame))
    return methods


async def test_only_one_channel_close_is_ever_sent() -> None:
    """A second close (another close() call, or a request given up while the close waits)
    would get a second close-ok, which could reach a new channel given the number."""
    conn, channel, _ = await connected()
    conn.rpc_timeout = 0.05
    first = asyncio.ensure_future(channel.close())
    second = asyncio.ensure_future(channel.close())
    with pytest.raises(ReplyTimeoutError):
        await channel.qos(10)  # given up while the close waits for its close-ok
    conn.data_received(pamqp.frame.marshal(cmd.Channel.CloseOk(), 1))
    await asyncio.gather(first, second)
    assert written_methods(conn) == [cmd.Basic.Qos, cmd.Channel.Close]
    assert 1 not in conn._channels


async def test_a_broker_close_crossing_the_close_of_a_given_up_channel_keeps_its_number() -> None:
    conn, channel, _ = await connected()
    conn.rpc_timeout = 0.05
    with pytest.raises(ReplyTimeoutError):
        await channel.qos(10)  # given up: a channel.close is sent
    conn.data_received(broker_close(406, "PRECONDITION_FAILED"))
    assert conn._channels[1] is channel
    conn.data_received(pamqp.frame.marshal(cmd.Channel.CloseOk(), 1))
    assert 1 not in conn._channels


async def test_a_broker_close_alone_frees_the_number_once_answered() -> None:
    conn, channel, _ = await connected()
    conn.data_received(broker_close(404, "NOT_FOUND"))
    assert not channel.is_open
    assert 1 not in conn._channels
    await asyncio.sleep(0)  # writes of this turn go out in the next
    assert pamqp.frame.marshal(cmd.Channel.CloseOk(), 1) in b"".join(conn._transport.written)  # type: ignore[union-attr]


async def test_a_late_get_ok_on_a_given_up_channel_is_skipped_with_its_content() -> None:
    conn, channel, _ = await connected()
    conn.rpc_timeout = 0.05
    with pytest.raises(ReplyTimeoutError):
        await channel.get("q")
    late = cmd.Basic.GetOk(delivery_tag=1, exchange="ex", routing_key="a.b", message_count=0)
    body = b"late body"
    conn.data_received(
        pamqp.frame.marshal(late, 1)
        + header_frame(len(body), pamqp_properties())
        + pamqp.frame.marshal(pamqp.body.ContentBody(body), 1)
    )
    assert conn.is_open  # not a "content header without a method" protocol error


async def test_a_cancelled_request_gives_its_channel_up() -> None:
    conn, channel, _ = await connected()
    waiter = asyncio.ensure_future(channel.qos(10))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not channel.is_open
    assert conn._channels[1] is channel  # until the broker confirms the close


async def test_a_delivery_for_a_consumer_that_is_gone_is_nacked_back_to_the_queue() -> None:
    conn, channel, _ = await connected()
    channel.consumers.clear()
    conn.data_received(delivery_bytes(1, 9, b"orphan"))
    await asyncio.sleep(0)  # writes of this turn go out in the next
    written = b"".join(conn._transport.written)  # type: ignore[union-attr]
    _, number, nack = pamqp.frame.unmarshal(written)
    assert number == 1
    assert isinstance(nack, cmd.Basic.Nack)
    assert (nack.delivery_tag, nack.requeue) == (9, True)


async def test_connection_blocked_holds_publishes_back_until_unblocked_and_after_a_full_buffer() -> None:
    conn, _, _ = await connected()
    seen: list[str | None] = []
    conn.on_blocked = seen.append
    conn.data_received(pamqp.frame.marshal(cmd.Connection.Blocked(reason="low on memory"), 0))
    assert (conn.writable_now, conn.blocked, seen) == (False, "low on memory", ["low on memory"])
    waiting = asyncio.ensure_future(conn.writable())
    conn.pause_writing()  # the socket's buffer fills meanwhile
    conn.data_received(pamqp.frame.marshal(cmd.Connection.Unblocked(), 0))
    await asyncio.sleep(0)
    assert not waiting.done()  # still the full buffer
    conn.resume_writing()
    await asyncio.wait_for(waiting, 1)
    assert (conn.writable_now, conn.blocked, seen) == (True, None, ["low on memory", None])


async def test_frames_held_back_by_a_rider_join_the_next_write() -> None:
    conn, _, _ = await connected()
    transport = conn._transport
    assert isinstance(transport, FakeTransport)
    calls: list[str] = []

    def rider() -> None:
        calls.append("rider")
        conn.write(b"held")

    conn.before_next_write(rider)
    await asyncio.sleep(0)
    assert transport.written == []  # a rider alone writes nothing
    assert calls == []
    conn.write(b"publish")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert transport.written == [b"publishheld"]  # one write, not two, in the order asked
    conn.write(b"more")
    await asyncio.sleep(0)
    assert transport.written == [b"publishheld", b"more"]
    assert calls == ["rider"]  # once only


async def test_held_acks_never_overtake_acks_of_the_same_channel_already_queued() -> None:
    """A batch of acks flushed in a turn, then more acks riding on that same write: the broker
    must see them in tag order (a multiple ack up to 3 before one up to 2 would ack 2 twice)."""
    from choreo.transport.rabbitmq import _Acks

    conn, channel, _ = await connected()
    transport = conn._transport
    assert isinstance(transport, FakeTransport)
    acks = _Acks(channel, window_s=30.0, batch=100)
    for tag in (1, 2, 3, 4):
        acks.delivered(tag)
    first = [acks.ack(1), acks.ack(2)]  # held, and registered to ride the next write
    acks.flush()  # out now: queued on the connection for the end of this turn
    later = acks.ack(3)  # held again; its ride is the write that carries the flush above
    await asyncio.gather(*first, later)
    data = b"".join(transport.written)
    tags = []
    while data:
        consumed, _, frame = pamqp.frame.unmarshal(data)
        data = data[consumed:]
        assert isinstance(frame, cmd.Basic.Ack)
        tags.append((frame.delivery_tag, frame.multiple))
    assert tags == [(2, True), (3, True)]
    assert len(transport.written) == 1  # and in one write


async def test_frames_sent_on_a_channel_after_our_close_raise_instead_of_being_discarded() -> None:
    """The broker discards what follows our channel.close on that channel: an ack written then
    would pass for sent and the message come back. It raises, so its waiter learns it."""
    from choreo.errors import TransportError

    _conn, channel, _ = await connected()
    closing = asyncio.create_task(channel.close())
    await asyncio.sleep(0)  # the close is written; its close-ok has not come
    with pytest.raises(TransportError, match="closing"):
        channel.send(frames.encode_ack(channel.number, 1))
    closing.cancel()
    with contextlib.suppress(BaseException):
        await closing


def raw_header_frame(body_size: int, flags: int, fields_: bytes, channel: int = 1) -> bytes:
    payload = frames._CONTENT_HEAD.pack(60, 0, body_size) + frames.U16.pack(flags) + fields_
    return frames.FRAME_HEAD.pack(frames.FRAME_HEADER, channel, len(payload)) + payload + b"\xce"


def table_bytes(entries: bytes) -> bytes:
    return frames.U32.pack(len(entries)) + entries


def nested_table(depth: int) -> bytes:
    table = table_bytes(b"")
    for _ in range(depth):
        table = table_bytes(b"\x01kF" + table)
    return table


def deliver_frame(tag: int, channel: int = 1) -> bytes:
    deliver = cmd.Basic.Deliver(consumer_tag="ctag", delivery_tag=tag, exchange="ex", routing_key="a.b")
    return pamqp.frame.marshal(deliver, channel)


@pytest.mark.parametrize(
    ("flags", "fields_", "complaint"),
    [
        (0x0080, b"\x04caf\xe9", "UnicodeDecodeError"),  # message_id in Latin-1
        (0x2000, table_bytes(b"\x04caf\xe9S" + frames.U32.pack(1) + b"v"), "UnicodeDecodeError"),  # a header name
        (0x2000, nested_table(frames.MAX_TABLE_DEPTH + 5), "nested deeper"),
        (0x2000, table_bytes(b"\x01kZ"), "unknown field type"),
    ],
    ids=["latin1-message-id", "latin1-header-name", "nested-too-deep", "unknown-type"],
)
async def test_a_delivery_whose_properties_cannot_be_decoded_still_arrives_marked_and_raw(
    flags: int, fields_: bytes, complaint: str
) -> None:
    """Its frames are whole, so only the message is odd: dropping the connection for it would
    requeue it (and every other unacked delivery) and bring it back, again and again."""
    conn, _, batches = await connected()
    stream = (
        deliver_frame(1) + raw_header_frame(4, flags, fields_) + pamqp.frame.marshal(pamqp.body.ContentBody(b"body"), 1)
    )
    stream += delivery_bytes(1, 2, b"next")
    conn.data_received(stream)
    assert conn.closed is None
    assert not conn._transport.aborted  # type: ignore[union-attr]
    odd, good = batches[0]
    assert (odd.delivery_tag, odd.body) == (1, b"body")
    headers = odd.properties.headers or {}
    assert set(headers) == {UNDECODABLE_PROPERTIES, RAW_PROPERTIES}
    assert complaint in str(headers[UNDECODABLE_PROPERTIES])
    assert headers[RAW_PROPERTIES] == frames.U16.pack(flags) + fields_
    assert (good.delivery_tag, good.body, good.properties.message_id) == (2, b"next", "m2")


def test_tables_nested_within_the_bound_decode() -> None:
    table, _ = frames.decode_table(nested_table(frames.MAX_TABLE_DEPTH), 0)
    depth = 0
    while table:
        table, depth = table["k"], depth + 1
    assert depth == frames.MAX_TABLE_DEPTH


def test_a_timestamp_past_year_9999_decodes_to_the_number_sent() -> None:
    millis = 1_795_000_000_000  # a timestamp in milliseconds, as some clients send by mistake
    table, _ = frames.decode_table(
        table_bytes(b"\x01tT" + frames.U64.pack(millis) + b"\x01uT" + frames.U64.pack(2**63)), 0
    )
    assert table == {"t": millis, "u": 2**63}
    seconds, _ = frames.decode_table(table_bytes(b"\x01tT" + frames.U64.pack(int(NOW.timestamp()))), 0)
    assert seconds == {"t": NOW}


def test_a_content_header_past_frame_max_is_refused_before_anything_is_written() -> None:
    fits = frames.encode_properties(frames.Properties(headers={"h": "x" * (4096 - 8 - 12 - 2 - 4 - 7)}))
    assert len(fits) == 4096 - 8 - 12
    frames.encode_publish(1, "ex", "rk", b"body", fits, frame_max=4096)
    too_big = frames.encode_properties(frames.Properties(headers={"h": "x" * (4096 - 8 - 12 - 2 - 4 - 7 + 1)}))
    with pytest.raises(frames.HeaderTooLargeError, match="headers cannot be split"):
        frames.encode_publish(1, "ex", "rk", b"body", too_big, frame_max=4096)
