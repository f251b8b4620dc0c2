"""The RabbitMQ transport's ack batching, against a fake channel that enforces AMQP's rule: an
ack (single or multiple) for a tag that is not outstanding is a channel error."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from choreo.errors import TransportError
from choreo.transport.rabbitmq import _AckBatcher


class FakeChannel:
    def __init__(self, *, write_delay: float = 0.0) -> None:
        self.outstanding: set[int] = set()
        self.frames: list[tuple[int, bool]] = []
        self.is_closed = False
        self.write_delay = write_delay

    def deliver(self, batcher: _AckBatcher, *tags: int) -> None:
        for tag in tags:
            self.outstanding.add(tag)
            batcher.delivered(self, tag)  # type: ignore[arg-type]

    async def basic_ack(self, tag: int, multiple: bool = False) -> None:
        if self.is_closed:
            raise RuntimeError("channel closed")
        if self.write_delay:
            await asyncio.sleep(self.write_delay)  # a frame still being written
        if tag not in self.outstanding:
            self.is_closed = True
            raise RuntimeError(f"PRECONDITION_FAILED - unknown delivery tag {tag}")
        self.frames.append((tag, multiple))
        self.outstanding -= {t for t in self.outstanding if t <= tag} if multiple else {tag}


async def ack_all(batcher: _AckBatcher, channel: FakeChannel, *tags: int) -> None:
    await asyncio.gather(*(batcher.ack(channel, tag) for tag in tags))  # type: ignore[arg-type]


async def test_acks_of_one_turn_become_one_multiple_ack_for_the_settled_prefix() -> None:
    batcher, channel = _AckBatcher(), FakeChannel()
    channel.deliver(batcher, 1, 2, 3, 4, 5, 6)
    await ack_all(batcher, channel, 2, 1, 3)
    assert channel.frames == [(3, True)]
    assert channel.outstanding == {4, 5, 6}


async def test_a_slow_message_does_not_hold_back_later_acks() -> None:
    batcher, channel = _AckBatcher(), FakeChannel()
    channel.deliver(batcher, 1, 2, 3, 4)
    await ack_all(batcher, channel, 2, 4)  # 1 and 3 still running
    assert channel.frames == [(2, False), (4, False)]
    assert channel.outstanding == {1, 3}
    await ack_all(batcher, channel, 1, 3)  # tags 2 and 4 were acked already: never again
    assert channel.outstanding == set()
    assert not channel.is_closed
    assert channel.frames[2:] == [(3, True)]  # 1 and 3 outstanding; 2 and 4 settled before


async def test_nacked_tags_count_as_settled_and_are_never_acked() -> None:
    batcher, channel = _AckBatcher(), FakeChannel()
    channel.deliver(batcher, 1, 2, 3)
    channel.outstanding.discard(2)  # nacked on its own, as the delivery does
    batcher.settled(channel, 2)  # type: ignore[arg-type]
    await ack_all(batcher, channel, 1, 3)
    assert channel.frames == [(3, True)]
    assert not channel.is_closed


async def test_flushes_never_overtake_each_other() -> None:
    # Frames take time to write; acks keep arriving meanwhile. A later multiple ack sent before
    # an earlier single ack would ack its tag first and close the channel.
    batcher, channel = _AckBatcher(), FakeChannel(write_delay=0.01)
    channel.deliver(batcher, *range(1, 201))
    order = list(range(1, 201))
    order[::7] = reversed(order[::7])  # finish out of order
    tasks: list[asyncio.Future[Any]] = []
    for i, tag in enumerate(order):
        tasks.append(batcher.ack(channel, tag))  # type: ignore[arg-type]
        if i % 13 == 0:  # let flushes start while frames are still being written
            await asyncio.sleep(0.003)
    await asyncio.gather(*tasks)
    assert not channel.is_closed
    assert channel.outstanding == set()
    assert len(channel.frames) < 100  # batched, not one frame per message


async def test_ack_on_a_closed_channel_raises_transport_error() -> None:
    batcher, channel = _AckBatcher(), FakeChannel()
    channel.deliver(batcher, 1)
    channel.is_closed = True
    with pytest.raises(TransportError, match="redeliver"):
        await batcher.ack(channel, 1)  # type: ignore[arg-type]
