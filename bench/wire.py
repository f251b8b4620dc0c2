"""The broker's own share of a hop, read off the wire: publish in -> deliver out.

``bench/run.py --wire`` runs ``tcpdump`` on the loopback interface while each saga step runs
and hands the capture to :func:`broker_latency`. For every message a client published and the
broker delivered, the latency is the capture time of the packet that completed the delivery
minus that of the packet that completed the publish (both cross ``lo``, so one clock). No
client's scheduling is inside it unless a consumer's prefetch window or socket buffer is full,
which holds its deliveries back. That splits a hop into what the broker takes and what the
two clients take, which the clients' own stamps (``--stages``) cannot: there, a broker leg
includes the receiving process's wake-up.

Deliveries are told apart by queue (from ``basic.consume``/``consume-ok``), so the taps the
bench reads after the run are left out by name. A publish and its deliveries are matched by
their bodies' digest: every choreo envelope and every ``raw_latency.py`` body is unique.

No dependency: the pcap file, IPv4/IPv6, TCP and AMQP 0-9-1 frame headers are read with
``struct``. ``python bench/wire.py CAPTURE.pcap`` prints the figures per queue.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from choreo_client import summary_ms  # nearest-rank, as every other figure of the bench

AMQP_PORT = 5672
_FRAME_METHOD, _FRAME_HEADER, _FRAME_BODY = 1, 2, 3
_FRAME_TYPES = (1, 2, 3, 8)  # 8: heartbeat
_MAX_FRAME = 1 << 24  # far above any frame_max a broker grants; a larger size is not a frame header
_BASIC = 60
_CONSUME, _CONSUME_OK, _PUBLISH, _DELIVER = 20, 21, 40, 60

Flow = tuple[bytes, int, bytes, int]  # (source address, port, destination address, port)
Connection = tuple[bytes, int]  # the client's end: (address, port)
Consumer = tuple[Connection, int, str]  # (connection, channel, consumer tag): tags are per channel


def why_not() -> str | None:
    """None when a capture can run here, else why not."""
    if shutil.which("tcpdump") is None:
        return "tcpdump is not installed (apt-get install tcpdump)"
    if os.geteuid() != 0:
        return "capturing on lo needs root (or CAP_NET_RAW for tcpdump)"
    return None


class CaptureError(RuntimeError):
    """tcpdump did not start."""


@dataclass
class Capture:
    path: Path
    problem: str | None = None  # set on exit if tcpdump reported dropped packets


@contextlib.contextmanager
def capture(path: Path, port: int = AMQP_PORT, *, ready_timeout: float = 10.0) -> Iterator[Capture]:
    """``tcpdump`` writes every AMQP packet on ``lo`` to ``path`` while the block runs.

    Returns once tcpdump says it listens, so nothing the block sends is missed; on exit it is
    stopped with SIGINT, which flushes the file. Raises :class:`CaptureError` if tcpdump does
    not start. Dropped packets do not raise (the block's own results stand): they are reported in
    :attr:`Capture.problem`, since such a capture cannot be reassembled into frames."""
    result = Capture(path)
    log = path.with_suffix(".log")
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [
                *("tcpdump", "-i", "lo", "-s", "0", "-B", "65536", "-U"),
                *("--time-stamp-precision=nano", "-w", str(path), f"tcp port {port}"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + ready_timeout
        while b"listening on" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise CaptureError(f"tcpdump did not start: {log.read_text(errors='replace')[-300:]}")
            time.sleep(0.02)
        yield result
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for line in log.read_text(errors="replace").splitlines():
        if line.endswith("packets dropped by kernel") and not line.startswith("0 "):
            result.problem = f"tcpdump dropped packets ({line}): the capture has gaps"


# pcap -> TCP flows ----------------------------------------------------------------------------
def _packets(path: Path) -> Iterator[tuple[float, Flow, int, bytes]]:
    """(time, flow, seq, payload) of each TCP segment with data."""
    data = path.read_bytes()
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise ValueError(f"{path}: not a pcap file")
    scale = 1e-9 if magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d") else 1e-6
    link = struct.unpack_from(endian + "I", data, 20)[0]
    record = struct.Struct(endian + "IIII")
    pos = 24
    while pos + 16 <= len(data):
        sec, frac, caplen, _ = record.unpack_from(data, pos)
        frame = data[pos + 16 : pos + 16 + caplen]
        pos += 16 + caplen
        if link == 1:  # Ethernet (what tcpdump writes for lo on Linux)
            ethertype, ip = struct.unpack_from(">H", frame, 12)[0], frame[14:]
        elif link == 113:  # Linux cooked capture
            ethertype, ip = struct.unpack_from(">H", frame, 14)[0], frame[16:]
        else:
            raise ValueError(f"{path}: link type {link} not supported")
        if ethertype == 0x0800 and ip[9] == 6:
            header_len, total = (ip[0] & 0x0F) * 4, struct.unpack_from(">H", ip, 2)[0]
            tcp, src, dst = ip[header_len:total], ip[12:16], ip[16:20]
        elif ethertype == 0x86DD and ip[6] == 6:
            tcp, src, dst = ip[40 : 40 + struct.unpack_from(">H", ip, 4)[0]], ip[8:24], ip[24:40]
        else:
            continue
        sport, dport, seq = struct.unpack_from(">HHI", tcp, 0)
        payload = tcp[(tcp[12] >> 4) * 4 :]
        if payload:
            yield sec + frac * scale, (src, sport, dst, dport), seq, payload


@dataclass
class _Stream:
    """One direction of one TCP connection, reassembled; ``ends[i]`` bytes had arrived at ``times[i]``."""

    data: bytearray = field(default_factory=bytearray)
    ends: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    segments: list[tuple[float, int, bytes]] = field(default_factory=list)

    def assemble(self) -> None:
        """Orders the segments by sequence number, whichever was captured first. Serial-number
        arithmetic (RFC 1982) places each against the first captured one, so a stream that
        wraps past 2**32, or a segment captured after a later one, still lands in place."""
        first = self.segments[0][1]

        def relative(seq: int) -> int:
            offset = (seq - first) % 2**32
            return offset - 2**32 if offset >= 2**31 else offset

        self.segments.sort(key=lambda s: (relative(s[1]), s[0]))
        base = relative(self.segments[0][1])
        for at, seq, payload in self.segments:
            offset = relative(seq) - base
            if offset + len(payload) <= len(self.data):
                continue  # a retransmission of what we have
            if offset > len(self.data):
                raise ValueError("a gap in a TCP stream: the capture missed packets")
            self.data += payload[len(self.data) - offset :]
            self.ends.append(len(self.data))
            self.times.append(at)
        self.segments = []

    def time_of(self, end: int) -> float:
        """When the byte before ``end`` arrived."""
        return self.times[min(bisect.bisect_left(self.ends, end), len(self.times) - 1)]


def _streams(path: Path) -> dict[Flow, _Stream]:
    streams: dict[Flow, _Stream] = defaultdict(_Stream)
    for at, flow, seq, payload in _packets(path):
        streams[flow].segments.append((at, seq, payload))
    for stream in streams.values():
        stream.assemble()
    return streams


# TCP streams -> AMQP messages ------------------------------------------------------------------
def _shortstr(buf: bytes, pos: int) -> tuple[str, int]:
    size = buf[pos]
    return buf[pos + 1 : pos + 1 + size].decode(errors="replace"), pos + 1 + size


@dataclass
class _Message:
    method: int
    detail: str  # publish: the exchange; deliver: the consumer tag
    size: int = -1  # from the content header
    body: bytearray = field(default_factory=bytearray)


def _messages(stream: _Stream) -> Iterator[tuple[str, int, float, str, bytes]]:
    """(kind, channel, time, detail, body): ``publish`` (detail: exchange), ``deliver`` (detail:
    consumer tag), ``consume`` (detail: queue + NUL + tag), ``consume-ok`` (detail: tag). A
    message's time is when the packet carrying its last byte was captured."""
    data, pos = stream.data, 0
    if data.startswith(b"AMQP"):
        pos = 8
    open_: dict[int, _Message] = {}
    while pos + 7 <= len(data):
        kind, channel, size = struct.unpack_from(">BHI", data, pos)
        if kind not in _FRAME_TYPES or size > _MAX_FRAME:
            raise ValueError(f"no AMQP frame at byte {pos}: the stream is not read from a frame's start")
        end = pos + 7 + size + 1
        if end > len(data):
            break  # the capture ended inside this frame
        if data[end - 1] != 0xCE:
            raise ValueError(f"no AMQP frame end at byte {end - 1}: the stream is not read from a frame's start")
        payload = bytes(data[pos + 7 : end - 1])
        pos = end
        if kind == _FRAME_METHOD:
            cls, method = struct.unpack_from(">HH", payload, 0)
            if cls != _BASIC:
                continue
            if method == _PUBLISH:
                exchange, _ = _shortstr(payload, 6)
                open_[channel] = _Message(method, exchange)
            elif method == _DELIVER:
                tag, _ = _shortstr(payload, 4)
                open_[channel] = _Message(method, tag)
            elif method == _CONSUME:
                queue, after = _shortstr(payload, 6)
                tag, _ = _shortstr(payload, after)
                yield "consume", channel, stream.time_of(end), f"{queue}\0{tag}", b""
            elif method == _CONSUME_OK:
                yield "consume-ok", channel, stream.time_of(end), _shortstr(payload, 4)[0], b""
        elif kind == _FRAME_HEADER and channel in open_:
            open_[channel].size = struct.unpack_from(">Q", payload, 4)[0]
        elif kind == _FRAME_BODY and channel in open_:
            open_[channel].body += payload
        else:
            continue
        message = open_.get(channel)
        if message is not None and message.size >= 0 and len(message.body) >= message.size:
            del open_[channel]
            name = "publish" if message.method == _PUBLISH else "deliver"
            yield name, channel, stream.time_of(end), message.detail, bytes(message.body)


def _digest(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=16).digest()


def broker_latency(path: Path, port: int = AMQP_PORT) -> dict[str, list[float]]:
    """Publish-in to deliver-out times in seconds, by the queue each delivery came from."""
    streams = _streams(path)
    published: dict[bytes, float] = {}
    deliveries: list[tuple[Consumer, float, bytes]] = []
    tags: dict[Consumer, str] = {}  # -> queue
    asked: dict[tuple[Connection, int], list[str]] = defaultdict(list)  # consumes awaiting a broker-named tag
    answers: list[Consumer] = []
    for flow, stream in sorted(streams.items(), key=lambda kv: kv[0][3] != port):  # client -> broker first
        to_broker = flow[3] == port
        client: Connection = (flow[0], flow[1]) if to_broker else (flow[2], flow[3])
        for kind, channel, at, detail, body in _messages(stream):
            if kind == "publish" and to_broker:
                published.setdefault(_digest(body), at)
            elif kind == "deliver" and not to_broker:
                deliveries.append(((client, channel, detail), at, body))
            elif kind == "consume" and to_broker:
                queue, tag = detail.split("\0")
                if tag:
                    tags[client, channel, tag] = queue
                else:
                    asked[client, channel].append(queue)
            elif kind == "consume-ok" and not to_broker:
                answers.append((client, channel, detail))
    for consumer in answers:  # a broker-named tag answers the oldest open consume of its channel
        if consumer not in tags and asked[consumer[:2]]:
            tags[consumer] = asked[consumer[:2]].pop(0)
    out: dict[str, list[float]] = defaultdict(list)
    seen: set[tuple[str, bytes]] = set()
    for consumer, at, body in sorted(deliveries, key=lambda d: d[1]):
        key = _digest(body)
        queue = tags.get(consumer, f"?{consumer[2]}")
        sent = published.get(key)
        # Only a message's first delivery from a queue: a redelivery, or a delayed retry's
        # return from its tier (the broker dead-letters it back: no publish on the wire), is
        # not a measure of the broker's pace.
        if sent is not None and (queue, key) not in seen:
            seen.add((queue, key))
            out[queue].append(at - sent)
    return dict(out)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[0], "\nusage: python bench/wire.py CAPTURE.pcap", file=sys.stderr)
        return 2
    for queue, values in sorted(broker_latency(Path(argv[0])).items()):
        f = summary_ms(values)
        print(f"{queue}: n={len(values)} p50={f['p50']:.2f} ms p99={f['p99']:.2f} ms max={f['max']:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
