"""The RabbitMQ transport's ack batching, against a fake channel that decodes the ack frames
it is sent and enforces AMQP's rule: an ack (single or multiple) for a tag that is not
outstanding is a channel error."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import pytest

from choreo.errors import TransportError
from choreo.transport.amqp.connection import ChannelClosedError
from choreo.transport.rabbitmq import _Acks

from ..conftest import turns

_ACK = struct.Struct(">BHIHHQBB")


class FakeConnection:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.riders: list[Any] = []

    def before_next_write(self, callback: Any) -> None:
        self.riders.append(callback)

    def write_something_else(self) -> None:
        """What Connection._flush does with its riders before a write of other frames."""
        riders, self.riders = self.riders, []
        for rider in riders:
            rider()


class FakeChannel:
    number = 7

    def __init__(self) -> None:
        self.connection = FakeConnection()
        self.outstanding: set[int] = set()
        self.frames: list[tuple[int, bool]] = []
        self.writes = 0
        self.closed = False

    def deliver(self, acks: _Acks, *tags: int) -> None:
        for tag in tags:
            self.outstanding.add(tag)
            acks.delivered(tag)

    def send(self, data: bytes) -> None:
        if self.closed:
            raise ChannelClosedError(406, "PRECONDITION_FAILED - closed")
        self.writes += 1
        for off in range(0, len(data), _ACK.size):
            kind, number, size, cls, method, tag, bits, end = _ACK.unpack_from(data, off)
            assert (kind, number, size, cls, method, end) == (1, 7, 13, 60, 80, 0xCE)
            if tag not in self.outstanding:
                self.closed = True
                raise ChannelClosedError(406, f"PRECONDITION_FAILED - unknown delivery tag {tag}")
            multiple = bool(bits & 1)
            self.frames.append((tag, multiple))
            self.outstanding -= {t for t in self.outstanding if t <= tag} if multiple else {tag}


def make(window_s: float = 0.0, batch: int = 1) -> tuple[_Acks, FakeChannel]:
    channel = FakeChannel()
    return _Acks(channel, window_s=window_s, batch=batch), channel  # type: ignore[arg-type]


async def ack_all(acks: _Acks, *tags: int) -> None:
    await asyncio.gather(*(acks.ack(tag) for tag in tags))


async def test_acks_of_one_turn_become_one_multiple_ack_for_the_settled_prefix() -> None:
    acks, channel = make()
    channel.deliver(acks, 1, 2, 3, 4, 5, 6)
    await ack_all(acks, 2, 1, 3)
    assert channel.frames == [(3, True)]
    assert channel.outstanding == {4, 5, 6}


async def test_a_slow_message_does_not_hold_back_later_acks() -> None:
    acks, channel = make()
    channel.deliver(acks, 1, 2, 3, 4)
    await ack_all(acks, 2, 4)  # 1 and 3 still running
    assert channel.frames == [(2, False), (4, False)]
    assert channel.writes == 1  # both frames in one write
    assert channel.outstanding == {1, 3}
    await ack_all(acks, 1, 3)  # tags 2 and 4 were acked already: never again
    assert channel.outstanding == set()
    assert not channel.closed
    assert channel.frames[2:] == [(3, True)]  # 1 and 3 outstanding; 2 and 4 settled before


async def test_nacked_tags_count_as_settled_and_are_never_acked() -> None:
    acks, channel = make()
    channel.deliver(acks, 1, 2, 3)
    channel.outstanding.discard(2)  # nacked on its own, as the delivery does
    acks.settled(2)
    await ack_all(acks, 1, 3)
    assert channel.frames == [(3, True)]
    assert not channel.closed


async def test_acks_arriving_over_many_turns_out_of_order_never_ack_a_tag_twice() -> None:
    acks, channel = make()
    channel.deliver(acks, *range(1, 201))
    order = list(range(1, 201))
    order[::7] = reversed(order[::7])  # finish out of order
    waiters: list[asyncio.Future[Any]] = []
    for i, tag in enumerate(order):
        waiters.append(acks.ack(tag))
        if i % 13 == 0:
            await asyncio.sleep(0)  # let a flush go out between acks
    await asyncio.gather(*waiters)
    assert not channel.closed
    assert channel.outstanding == set()
    assert channel.writes <= 200 // 13 + 2  # one write per loop turn, not one per ack


async def test_ack_on_a_closed_channel_raises_transport_error() -> None:
    acks, channel = make()
    channel.deliver(acks, 1)
    channel.closed = True
    with pytest.raises(TransportError, match="redeliver"):
        await acks.ack(1)


# -- the settle window: acks wait for company ------------------------------------------------


async def test_with_a_window_acks_wait_for_it_and_then_go_out_as_one_multiple_ack() -> None:
    acks, channel = make(window_s=0.02, batch=100)
    channel.deliver(acks, 1, 2, 3, 4)
    first = acks.ack(1)
    await turns()
    later = [acks.ack(2), acks.ack(3)]
    async with asyncio.timeout(5):
        await asyncio.gather(first, *later)
    assert channel.frames == [(3, True)]
    assert channel.writes == 1
    assert channel.outstanding == {4}


async def test_held_acks_join_the_next_write_of_other_frames() -> None:
    acks, channel = make(window_s=30.0, batch=100)
    channel.deliver(acks, 1, 2)
    waiter = acks.ack(1)
    await turns()
    assert channel.frames == []  # held: the window is long
    assert not waiter.done()
    channel.connection.write_something_else()  # say, a publish of the next handler's event
    await waiter
    assert channel.frames == [(1, True)]
    # A rider already used is not called again, and a new ack registers a new one.
    assert channel.connection.riders == []
    second = acks.ack(2)
    assert len(channel.connection.riders) == 1
    channel.connection.write_something_else()
    await second
    assert channel.frames == [(1, True), (2, True)]


async def test_a_batch_of_waiting_acks_goes_out_at_the_end_of_the_turn_without_waiting() -> None:
    acks, channel = make(window_s=30.0, batch=3)
    channel.deliver(acks, 1, 2, 3, 4)
    await ack_all(acks, 1, 2, 3)  # the third fills the batch: no 30 s wait
    assert channel.frames == [(3, True)]
    assert acks.timer is None  # the window's timer went with the flush


async def test_flush_sends_held_acks_at_once() -> None:
    acks, channel = make(window_s=30.0, batch=100)
    channel.deliver(acks, 1, 2)
    waiters = [acks.ack(1), acks.ack(2)]
    acks.flush()  # what the subscription does before it stops consuming
    assert channel.frames == [(2, True)]
    await asyncio.gather(*waiters)
    channel.connection.write_something_else()  # the stale rider finds nothing to send
    assert channel.writes == 1


async def test_held_acks_on_a_channel_closed_meanwhile_fail_their_waiters() -> None:
    acks, channel = make(window_s=30.0, batch=100)
    channel.deliver(acks, 1)
    waiter = acks.ack(1)
    channel.closed = True
    acks.flush()
    with pytest.raises(TransportError, match="redeliver"):
        await waiter
