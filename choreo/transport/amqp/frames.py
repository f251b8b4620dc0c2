"""AMQP 0-9-1 frames: hand-written codecs for the hot frames, pamqp for the rest.

The hot frames are the ones every message crosses: ``basic.deliver``, its content header and
body in; ``basic.publish`` with header and body, and ``basic.ack`` out; the broker's
``basic.ack``/``basic.nack`` publisher confirms in. pamqp decodes choreo's content header
alone in about 15 µs; these codecs read and write only what is there, straight from the
receive buffer. Everything else (handshake, declarations, qos, consume, close) is rare and
goes through pamqp; this is the only module that imports it.

Layouts follow the AMQP 0-9-1 specification and RabbitMQ's field-table types
(``t b B s u I i l f d D S A T F V x``). ``tests/unit/test_amqp_frames.py`` checks each codec
against pamqp, byte for byte where both encode.
"""

from __future__ import annotations

import datetime
import decimal
import struct
from typing import Any, cast

import pamqp.commands
import pamqp.encode
import pamqp.frame
import pamqp.header
from pamqp.base import Frame

__all__ = [
    "FRAME_BODY",
    "FRAME_END",
    "FRAME_HEADER",
    "FRAME_HEARTBEAT",
    "FRAME_METHOD",
    "HEARTBEAT",
    "PROTOCOL_HEADER",
    "Frame",
    "FrameError",
    "Properties",
    "commands",
    "decode_method",
    "decode_properties",
    "decode_table",
    "encode_ack",
    "encode_method",
    "encode_nack",
    "encode_properties",
    "encode_publish",
    "encode_table",
]

commands = pamqp.commands

FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT = 1, 2, 3, 8
FRAME_END = 0xCE
PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
HEARTBEAT = b"\x08\x00\x00\x00\x00\x00\x00\xce"

# class and method ids as one 32-bit number, as they sit at the start of a method payload
BASIC_DELIVER = (60 << 16) | 60
BASIC_ACK = (60 << 16) | 80
BASIC_NACK = (60 << 16) | 120
BASIC_RETURN = (60 << 16) | 50
BASIC_GET_OK = (60 << 16) | 71

FRAME_HEAD = struct.Struct(">BHI")
U8 = struct.Struct(">B")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
_CONTENT_HEAD = struct.Struct(">HHQ")
TAG_BITS = struct.Struct(">QB")
_ACK_FRAME = struct.Struct(">BHIHHQBB")  # a whole basic.ack / basic.nack frame


class FrameError(ValueError):
    """Bytes that are not a valid AMQP frame: the connection cannot continue."""


class HeaderTooLargeError(ValueError):
    """A message's properties and headers do not fit in one content header frame. Unlike a
    body, a header cannot be split, and the broker answers an oversized frame by closing the
    whole connection: such a message must not be sent at all."""


# Field tables nest through recursion: a bound keeps a hostile header from exhausting the stack.
MAX_TABLE_DEPTH = 32


class Properties:
    """The basic-class content properties, in wire order. Absent ones are None."""

    __slots__ = (
        "app_id",
        "cluster_id",
        "content_encoding",
        "content_type",
        "correlation_id",
        "delivery_mode",
        "expiration",
        "headers",
        "message_id",
        "priority",
        "reply_to",
        "timestamp",
        "type",
        "user_id",
    )

    def __init__(
        self,
        *,
        content_type: str | None = None,
        content_encoding: str | None = None,
        headers: dict[str, Any] | None = None,
        delivery_mode: int | None = None,
        priority: int | None = None,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        expiration: str | None = None,
        message_id: str | None = None,
        timestamp: int | None = None,
        type: str | None = None,
        user_id: str | None = None,
        app_id: str | None = None,
        cluster_id: str | None = None,
    ) -> None:
        self.content_type = content_type
        self.content_encoding = content_encoding
        self.headers = headers
        self.delivery_mode = delivery_mode
        self.priority = priority
        self.correlation_id = correlation_id
        self.reply_to = reply_to
        self.expiration = expiration
        self.message_id = message_id
        self.timestamp = timestamp  # seconds since the epoch
        self.type = type
        self.user_id = user_id
        self.app_id = app_id
        self.cluster_id = cluster_id

    def __repr__(self) -> str:
        present = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__ if getattr(self, n) is not None)
        return f"Properties({present})"


# ---------------------------------------------------------------------------------------------
# field tables


def _decode_value(buf: bytes | bytearray, off: int, depth: int) -> tuple[Any, int]:
    kind = buf[off]
    off += 1
    if kind == 83:  # S: long string; UTF-8 text, or bytes when it is not (as pamqp does)
        (n,) = U32.unpack_from(buf, off)
        off += 4
        raw = bytes(buf[off : off + n])
        if len(raw) != n:
            raise FrameError("long string runs past its table")
        try:
            return raw.decode(), off + n
        except UnicodeDecodeError:
            return raw, off + n
    if kind == 73:  # I
        return struct.unpack_from(">i", buf, off)[0], off + 4
    if kind in {108, 76}:  # l, L
        return struct.unpack_from(">q", buf, off)[0], off + 8
    if kind == 116:  # t
        return buf[off] != 0, off + 1
    if kind == 70:  # F
        return decode_table(buf, off, depth + 1)
    if kind == 65:  # A
        (n,) = U32.unpack_from(buf, off)
        off += 4
        end = off + n
        items: list[Any] = []
        if depth >= MAX_TABLE_DEPTH:
            raise FrameError(f"field values nested deeper than {MAX_TABLE_DEPTH}")
        while off < end:
            item, off = _decode_value(buf, off, depth + 1)
            items.append(item)
        if off != end:
            raise FrameError("array runs past its length")
        return items, off
    if kind == 84:  # T: seconds, as a UTC datetime (pamqp's type)
        (seconds,) = U64.unpack_from(buf, off)
        try:
            return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC), off + 8
        except (ValueError, OverflowError, OSError):
            return seconds, off + 8  # past year 9999 (milliseconds, say): the number as sent
    if kind == 98:  # b
        return struct.unpack_from(">b", buf, off)[0], off + 1
    if kind == 66:  # B
        return buf[off], off + 1
    if kind == 115:  # s
        return struct.unpack_from(">h", buf, off)[0], off + 2
    if kind == 117:  # u
        return U16.unpack_from(buf, off)[0], off + 2
    if kind == 105:  # i
        return U32.unpack_from(buf, off)[0], off + 4
    if kind == 102:  # f
        return struct.unpack_from(">f", buf, off)[0], off + 4
    if kind == 100:  # d
        return struct.unpack_from(">d", buf, off)[0], off + 8
    if kind == 68:  # D: scale, then a signed 32-bit unscaled value
        scale = buf[off]
        (unscaled,) = struct.unpack_from(">i", buf, off + 1)
        return decimal.Decimal(unscaled).scaleb(-scale), off + 5
    if kind in {86, 0}:  # V (and a zero byte, seen in the wild)
        return None, off
    if kind == 120:  # x: byte array
        (n,) = U32.unpack_from(buf, off)
        off += 4
        return bytes(buf[off : off + n]), off + n
    raise FrameError(f"unknown field type {chr(kind)!r} in a field table")


def decode_table(buf: bytes | bytearray, off: int, depth: int = 0) -> tuple[dict[str, Any], int]:
    """The field table at ``off`` and the offset after it."""
    if depth > MAX_TABLE_DEPTH:
        raise FrameError(f"field tables nested deeper than {MAX_TABLE_DEPTH}")
    (n,) = U32.unpack_from(buf, off)
    off += 4
    end = off + n
    if end > len(buf):
        raise FrameError("field table runs past its frame")
    table: dict[str, Any] = {}
    while off < end:
        k = buf[off]
        key = buf[off + 1 : off + 1 + k].decode()
        off += 1 + k
        if buf[off] == 83:  # S, the type of nearly every header: decoded here, not in a call
            (n,) = U32.unpack_from(buf, off + 1)
            start = off + 5
            off = start + n
            if off > end:
                raise FrameError("long string runs past its table")
            try:
                table[key] = buf[start:off].decode()
            except UnicodeDecodeError:  # bytes when it is not UTF-8 text, as pamqp does
                table[key] = bytes(buf[start:off])
        else:
            table[key], off = _decode_value(buf, off, depth)
    if off != end:
        raise FrameError("field table runs past its length")
    return table, off


def _table_int(value: int) -> bytes:
    # The smallest type that holds the value, as pamqp does, so that both encode alike.
    if -128 <= value <= 127:
        return b"b" + struct.pack(">b", value)
    if -32768 <= value <= 32767:
        return b"s" + struct.pack(">h", value)
    if 0 <= value <= 65535:
        return b"u" + U16.pack(value)
    if -2147483648 <= value <= 2147483647:
        return b"I" + struct.pack(">i", value)
    if 0 <= value <= 4294967295:
        return b"i" + U32.pack(value)
    return b"l" + struct.pack(">q", value)


def _encode_value(value: object) -> bytes:
    if isinstance(value, str):
        raw = value.encode()
        return b"S" + U32.pack(len(raw)) + raw
    if isinstance(value, bool):
        return b"t\x01" if value else b"t\x00"
    if isinstance(value, int):
        return _table_int(value)
    if value is None:
        return b"V"
    if isinstance(value, bytes | bytearray):
        return b"x" + U32.pack(len(value)) + bytes(value)
    if isinstance(value, float):
        return b"d" + struct.pack(">d", value)  # a double: pamqp's 'f' would lose precision
    if isinstance(value, dict):
        return b"F" + encode_table(value)
    if isinstance(value, list | tuple):
        items = b"".join(_encode_value(item) for item in value)
        return b"A" + U32.pack(len(items)) + items
    if isinstance(value, datetime.datetime):
        return b"T" + U64.pack(int(value.replace(tzinfo=value.tzinfo or datetime.UTC).timestamp()))
    if isinstance(value, decimal.Decimal):
        return pamqp.encode.encode_table_value(value)
    raise TypeError(f"cannot put a {type(value).__name__} in an AMQP header: {value!r}")


def encode_table(table: dict[str, Any] | None) -> bytes:
    """A field table, keys in sorted order (as pamqp writes them)."""
    if not table:
        return b"\x00\x00\x00\x00"
    parts: list[bytes] = []
    for key in sorted(table):
        name = _NAMES.get(key)
        if name is None:
            name = _shortstr_bytes(key, "header name")
            if len(_NAMES) < _NAMES_KEPT:
                _NAMES[key] = name
        value = table[key]
        if type(value) is str:  # nearly every header: no call for it
            raw = value.encode()
            parts += (name, b"S", U32.pack(len(raw)), raw)
        else:
            parts += (name, _encode_value(value))
    body = b"".join(parts)
    return U32.pack(len(body)) + body


# Header names repeat on every message: their encoded form is kept, up to a bound (any
# sender can make up names).
_NAMES: dict[str, bytes] = {}
_NAMES_KEPT = 1024
_LENGTH = [bytes((n,)) for n in range(256)]


def _shortstr_bytes(value: str, what: str = "AMQP short string") -> bytes:
    """``value`` as an AMQP short string: its length byte, then its UTF-8 bytes."""
    raw = value.encode()
    if len(raw) > 255:
        raise TypeError(f"{what} longer than 255 bytes: {value[:40]!r}...")
    return _LENGTH[len(raw)] + raw


# ---------------------------------------------------------------------------------------------
# content header properties


def _shortstr(buf: bytes | bytearray, off: int) -> tuple[str, int]:
    n = buf[off]
    return buf[off + 1 : off + 1 + n].decode(), off + 1 + n


def decode_properties(buf: bytes | bytearray, off: int) -> Properties:  # noqa: PLR0915 - unrolled on purpose
    """The properties of a content header whose property flags start at ``off``."""
    # Short strings are decoded inline (no call per property): this runs once per delivery.
    (flags,) = U16.unpack_from(buf, off)
    off += 2
    if flags & 1:
        raise FrameError("continued property flags: the basic class has no such properties")
    props = Properties()
    if flags & 0x8000:
        end = off + 1 + buf[off]
        props.content_type = buf[off + 1 : end].decode()
        off = end
    if flags & 0x4000:
        end = off + 1 + buf[off]
        props.content_encoding = buf[off + 1 : end].decode()
        off = end
    if flags & 0x2000:
        props.headers, off = decode_table(buf, off)
    if flags & 0x1000:
        props.delivery_mode = buf[off]
        off += 1
    if flags & 0x0800:
        props.priority = buf[off]
        off += 1
    if flags & 0x0400:
        end = off + 1 + buf[off]
        props.correlation_id = buf[off + 1 : end].decode()
        off = end
    if flags & 0x0200:
        end = off + 1 + buf[off]
        props.reply_to = buf[off + 1 : end].decode()
        off = end
    if flags & 0x0100:
        end = off + 1 + buf[off]
        props.expiration = buf[off + 1 : end].decode()
        off = end
    if flags & 0x0080:
        end = off + 1 + buf[off]
        props.message_id = buf[off + 1 : end].decode()
        off = end
    if flags & 0x0040:
        (props.timestamp,) = U64.unpack_from(buf, off)
        off += 8
    if flags & 0x0020:
        end = off + 1 + buf[off]
        props.type = buf[off + 1 : end].decode()
        off = end
    if flags & 0x0010:
        end = off + 1 + buf[off]
        props.user_id = buf[off + 1 : end].decode()
        off = end
    if flags & 0x0008:
        end = off + 1 + buf[off]
        props.app_id = buf[off + 1 : end].decode()
        off = end
    if flags & 0x0004:
        end = off + 1 + buf[off]
        props.cluster_id = buf[off + 1 : end].decode()
    return props


def encode_properties(props: Properties) -> bytes:
    """Property flags and list, as they follow the body size in a content header."""
    flags = 0
    parts: list[bytes] = [b""]
    if props.content_type is not None:
        flags |= 0x8000
        parts.append(_shortstr_bytes(props.content_type))
    if props.content_encoding is not None:
        flags |= 0x4000
        parts.append(_shortstr_bytes(props.content_encoding))
    if props.headers is not None:
        flags |= 0x2000
        parts.append(encode_table(props.headers))
    if props.delivery_mode is not None:
        flags |= 0x1000
        parts.append(bytes((props.delivery_mode,)))
    if props.priority is not None:
        flags |= 0x0800
        parts.append(bytes((props.priority,)))
    if props.correlation_id is not None:
        flags |= 0x0400
        parts.append(_shortstr_bytes(props.correlation_id))
    if props.reply_to is not None:
        flags |= 0x0200
        parts.append(_shortstr_bytes(props.reply_to))
    if props.expiration is not None:
        flags |= 0x0100
        parts.append(_shortstr_bytes(props.expiration))
    if props.message_id is not None:
        flags |= 0x0080
        parts.append(_shortstr_bytes(props.message_id))
    if props.timestamp is not None:
        flags |= 0x0040
        parts.append(U64.pack(props.timestamp))
    if props.type is not None:
        flags |= 0x0020
        parts.append(_shortstr_bytes(props.type))
    if props.user_id is not None:
        flags |= 0x0010
        parts.append(_shortstr_bytes(props.user_id))
    if props.app_id is not None:
        flags |= 0x0008
        parts.append(_shortstr_bytes(props.app_id))
    if props.cluster_id is not None:
        flags |= 0x0004
        parts.append(_shortstr_bytes(props.cluster_id))
    parts[0] = U16.pack(flags)
    return b"".join(parts)


# ---------------------------------------------------------------------------------------------
# whole frames out


def encode_publish(
    channel: int,
    exchange: str,
    routing_key: str,
    body: bytes,
    properties: bytes,
    *,
    mandatory: bool = False,
    frame_max: int = 131072,
) -> bytes:
    """``basic.publish``, its content header (``properties`` from :func:`encode_properties`)
    and its body, split into body frames of at most ``frame_max`` bytes, as one buffer."""
    ex, rk = exchange.encode(), routing_key.encode()
    if len(ex) > 255 or len(rk) > 255:
        raise TypeError("exchange and routing key are at most 255 bytes")
    method = b"".join(
        (b"\x00<\x00(\x00\x00", bytes((len(ex),)), ex, bytes((len(rk),)), rk, b"\x01" if mandatory else b"\x00")
    )
    header = _CONTENT_HEAD.pack(60, 0, len(body)) + properties
    if len(header) > frame_max - 8:
        raise HeaderTooLargeError(
            f"properties and headers take {len(header)} bytes; one content header frame holds "
            f"{frame_max - 8} (frame_max {frame_max}), and headers cannot be split across frames"
        )
    parts = [
        FRAME_HEAD.pack(FRAME_METHOD, channel, len(method)),
        method,
        b"\xce",
        FRAME_HEAD.pack(FRAME_HEADER, channel, len(header)),
        header,
        b"\xce",
    ]
    room = frame_max - 8
    for start in range(0, len(body), room):
        chunk = body[start : start + room]
        parts += (FRAME_HEAD.pack(FRAME_BODY, channel, len(chunk)), chunk, b"\xce")
    return b"".join(parts)


def encode_ack(channel: int, delivery_tag: int, *, multiple: bool = False) -> bytes:
    return _ACK_FRAME.pack(FRAME_METHOD, channel, 13, 60, 80, delivery_tag, 1 if multiple else 0, FRAME_END)


def encode_nack(channel: int, delivery_tag: int, *, multiple: bool = False, requeue: bool = True) -> bytes:
    bits = (1 if multiple else 0) | (2 if requeue else 0)
    return _ACK_FRAME.pack(FRAME_METHOD, channel, 13, 60, 120, delivery_tag, bits, FRAME_END)


def encode_method(channel: int, method: Frame) -> bytes:
    """Any other method frame (pamqp)."""
    return pamqp.frame.marshal(method, channel)


def decode_method(frame: bytes) -> Frame:
    """Any other method frame (pamqp), given the whole frame including its end byte."""
    try:
        _, _, value = pamqp.frame.unmarshal(frame)
    except Exception as exc:  # pamqp raises several types for malformed input
        raise FrameError(f"malformed method frame: {exc!r}") from exc
    return cast(Frame, value)


def decode_deliver(buf: bytes | bytearray, off: int) -> tuple[str, int, bool, str, str]:
    """``basic.deliver`` arguments after the class and method ids: consumer tag, delivery tag,
    redelivered, exchange, routing key."""
    consumer_tag, off = _shortstr(buf, off)
    tag, bits = TAG_BITS.unpack_from(buf, off)
    exchange, off = _shortstr(buf, off + 9)
    routing_key, _ = _shortstr(buf, off)
    return consumer_tag, tag, bool(bits & 1), exchange, routing_key
