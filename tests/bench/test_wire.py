"""bench/wire.py reads the broker's publish-in to deliver-out time off a synthetic capture."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import wire  # noqa: E402

BROKER = 5672
PUBLISHER, CONSUMER = 40001, 40002


def shortstr(text: str) -> bytes:
    return bytes([len(text)]) + text.encode()


def frame(kind: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + b"\xce"


def method(channel: int, number: int, args: bytes) -> bytes:
    return frame(1, channel, struct.pack(">HH", 60, number) + args)


def content(channel: int, body: bytes) -> bytes:
    header = frame(2, channel, struct.pack(">HHQH", 60, 0, len(body), 0))
    return header + frame(3, channel, body)


def publish(channel: int, body: bytes) -> bytes:
    return method(channel, 40, b"\0\0" + shortstr("events") + shortstr("order.placed") + b"\0") + content(channel, body)


def deliver(channel: int, tag: str, body: bytes, delivery_tag: int, redelivered: bool = False) -> bytes:
    args = shortstr(tag) + struct.pack(">QB", delivery_tag, redelivered) + shortstr("events") + shortstr("order.placed")
    return method(channel, 60, args) + content(channel, body)


def consume(channel: int, queue: str, tag: str) -> bytes:
    return method(channel, 20, b"\0\0" + shortstr(queue) + shortstr(tag) + b"\0" + struct.pack(">I", 0))


def consume_ok(channel: int, tag: str) -> bytes:
    return method(channel, 21, shortstr(tag))


class Pcap:
    """Ethernet/IPv4/TCP segments on loopback, as tcpdump writes them (nanosecond stamps)."""

    def __init__(self, first_seq: int = 1000) -> None:
        self.records: list[bytes] = []
        self.seq: dict[tuple[int, int], int] = {}
        self.first_seq = first_seq

    def send(self, at: float, sport: int, dport: int, payload: bytes, *, seq: int | None = None) -> None:
        start = self.seq.setdefault((sport, dport), self.first_seq)
        if seq is None:
            seq = start
            self.seq[sport, dport] = (start + len(payload)) % 2**32
        tcp = struct.pack(">HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x18, 65535, 0, 0) + payload
        ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, 6, 0, bytes(4), bytes(4)) + tcp
        packet = bytes(12) + b"\x08\x00" + ip
        sec, nsec = int(at), round((at - int(at)) * 1e9)
        self.records.append(struct.pack("<IIII", sec, nsec, len(packet), len(packet)) + packet)

    def write(self, path: Path) -> Path:
        header = struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 262144, 1)
        path.write_bytes(header + b"".join(self.records))
        return path


def test_latency_per_queue_from_the_last_byte_of_the_publish_to_the_last_of_each_delivery(tmp_path: Path) -> None:
    body, other = b'{"id":"e-1"}' * 20, b'{"id":"e-2"}'
    cap = Pcap()
    cap.send(0.5, CONSUMER, BROKER, b"AMQP\x00\x00\x09\x01" + consume(1, "q.a", "c1") + consume(2, "q.b", ""))
    cap.send(0.6, BROKER, CONSUMER, consume_ok(1, "c1") + consume_ok(2, "amq.ctag-x"))
    sent = b"AMQP\x00\x00\x09\x01" + publish(1, body)
    cap.send(1.000, PUBLISHER, BROKER, sent[:-30])  # the publish ends in the second segment
    cap.send(1.001, PUBLISHER, BROKER, sent[-30:])
    cap.send(1.002, PUBLISHER, BROKER, publish(1, other))
    cap.send(1.004, BROKER, CONSUMER, deliver(1, "c1", body, 1))
    cap.send(1.006, BROKER, CONSUMER, deliver(2, "amq.ctag-x", body, 1))
    cap.send(1.500, BROKER, CONSUMER, deliver(1, "c1", body, 2, redelivered=True))  # not a second sample
    cap.send(1.0025, BROKER, CONSUMER, b"")  # an empty segment (an ACK) is ignored

    got = wire.broker_latency(cap.write(tmp_path / "c.pcap"))

    assert set(got) == {"q.a", "q.b"}  # ``other`` was never delivered
    assert got["q.a"] == pytest.approx([0.003], abs=1e-6)
    assert got["q.b"] == pytest.approx([0.005], abs=1e-6)


def test_a_capture_with_a_gap_is_refused(tmp_path: Path) -> None:
    cap = Pcap()
    cap.send(1.0, PUBLISHER, BROKER, publish(1, b"x" * 50))
    cap.send(1.1, PUBLISHER, BROKER, publish(1, b"y" * 50), seq=5000)  # bytes in between were lost
    with pytest.raises(ValueError, match="gap"):
        wire.broker_latency(cap.write(tmp_path / "gap.pcap"))


def test_not_a_pcap_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "nope.pcap"
    path.write_bytes(b"not a capture at all")
    with pytest.raises(ValueError, match="not a pcap"):
        wire.broker_latency(path)


def test_a_stream_that_wraps_past_2_32_and_segments_captured_out_of_order(tmp_path: Path) -> None:
    body = b'{"id":"e-wrap"}' * 10
    cap = Pcap(first_seq=2**32 - 50)  # the publish's bytes cross the wrap
    cap.send(0.5, CONSUMER, BROKER, consume(1, "q.a", "c1"))
    sent = publish(1, body)
    # The second half is captured first (seq computed as if sent in order).
    cap.send(1.001, PUBLISHER, BROKER, sent[60:], seq=(2**32 - 50 + 60) % 2**32)
    cap.send(1.000, PUBLISHER, BROKER, sent[:60], seq=2**32 - 50)
    cap.send(1.004, BROKER, CONSUMER, deliver(1, "c1", body, 1))

    got = wire.broker_latency(cap.write(tmp_path / "wrap.pcap"))

    assert got["q.a"] == pytest.approx([0.003], abs=1e-6)


def test_frames_of_two_channels_interleaved_and_one_tag_on_both(tmp_path: Path) -> None:
    """Consumer tags are per channel: the same tag on channels 1 and 2 names two consumers."""
    a, b = b'{"id":"e-a"}', b'{"id":"e-b"}'
    cap = Pcap()
    cap.send(0.5, CONSUMER, BROKER, consume(1, "q.a", "same") + consume(2, "q.b", "same"))
    cap.send(1.000, PUBLISHER, BROKER, publish(1, a) + publish(1, b))
    da, db = deliver(1, "same", a, 1), deliver(2, "same", b, 1)
    split_a, split_b = len(da) - len(content(1, a)), len(db) - len(content(2, b))
    # method 1, method 2, then channel 1's content, then channel 2's: one segment each
    cap.send(1.002, BROKER, CONSUMER, da[:split_a] + db[:split_b])
    cap.send(1.003, BROKER, CONSUMER, da[split_a:])
    cap.send(1.007, BROKER, CONSUMER, db[split_b:])

    got = wire.broker_latency(cap.write(tmp_path / "interleaved.pcap"))

    assert got == {"q.a": pytest.approx([0.003], abs=1e-6), "q.b": pytest.approx([0.007], abs=1e-6)}


def test_a_stream_read_from_inside_a_frame_is_refused(tmp_path: Path) -> None:
    cap = Pcap()
    cap.send(1.0, PUBLISHER, BROKER, publish(1, b"x" * 50)[3:])  # the capture began mid-frame
    with pytest.raises(ValueError, match="not read from a frame's start"):
        wire.broker_latency(cap.write(tmp_path / "mid.pcap"))
