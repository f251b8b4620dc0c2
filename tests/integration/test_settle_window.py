"""Acks held back for company (the settle window) against the real broker: they are acks like
any other once sent, and stopping the consumer sends the held ones first."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from choreo.config import Naming
from choreo.testing import wait_for
from choreo.topology import QueueSpec, Topology
from choreo.transport.base import Delivery, OutgoingMessage
from choreo.transport.rabbitmq import RabbitMQTransport

pytestmark = pytest.mark.rabbitmq


async def test_acks_held_in_a_long_window_go_out_before_the_consumer_stops(
    rabbit_factory: Callable[[], Awaitable[RabbitMQTransport]], naming: Naming
) -> None:
    transport = await rabbit_factory()
    transport.ack_window_s = 30.0  # far longer than the test: only the close can send them
    queue = QueueSpec(f"{naming.queue_prefix}settle", {"x-queue-type": "quorum"}, ("a.b",))
    await transport.declare(Topology(naming.exchange, (queue,)))
    for i in range(3):
        await transport.publish(OutgoingMessage(naming.exchange, "a.b", f"m{i}".encode(), message_id=f"m{i}"))

    acks: list[asyncio.Task[None]] = []

    async def handler(delivery: Delivery) -> None:
        acks.append(asyncio.current_task())  # type: ignore[arg-type]
        await delivery.ack()

    await transport.subscribe(queue.name, handler, prefetch=64)  # batch 16: three acks wait
    await wait_for(lambda: len(acks) == 3, within=10, what="three deliveries")
    await asyncio.sleep(0)
    assert not any(task.done() for task in acks)  # held: the window has not passed
    await transport.close()  # cancels the consumer and closes its channel
    assert all(task.done() and task.exception() is None for task in acks)

    observer = await rabbit_factory()
    # Unacked deliveries would have returned to the queue when the channel closed.
    assert await observer.queue_depth(queue.name) == 0
    assert await observer.get(queue.name) is None


async def test_a_busy_consumer_with_a_window_keeps_its_channel_and_acks_each_message_once(
    rabbit_factory: Callable[[], Awaitable[RabbitMQTransport]], naming: Naming
) -> None:
    """Acks flushed by the batch limit and acks riding on the same write interleave here on
    every turn; one out of order (or twice) and the broker closes the channel (406), which
    shows up as redeliveries and a new channel."""
    transport = await rabbit_factory()
    transport.ack_window_s = 0.01
    queue = QueueSpec(f"{naming.queue_prefix}busy", {"x-queue-type": "quorum"}, ("a.b",))
    await transport.declare(Topology(naming.exchange, (queue,)))
    total = 3000
    await asyncio.gather(
        *(transport.publish(OutgoingMessage(naming.exchange, "a.b", b"x", message_id=str(i))) for i in range(total))
    )
    seen: list[Delivery] = []

    async def handler(delivery: Delivery) -> None:
        seen.append(delivery)
        await delivery.ack()

    sub = await transport.subscribe(queue.name, handler, prefetch=64)
    channel = sub._channel  # type: ignore[attr-defined]
    await wait_for(lambda: len(seen) >= total, within=60, what="every message handled")
    assert not any(d.redelivered for d in seen)
    assert len(seen) == total
    assert sub._channel is channel  # type: ignore[attr-defined]
    assert channel.is_open
    await wait_for(lambda: not sub._acks.waiters, within=5, what="the last acks sent")  # type: ignore[attr-defined]
    observer = await rabbit_factory()
    assert await observer.queue_depth(queue.name) == 0


async def test_acks_held_when_the_broker_closes_the_channel_fail_at_once_not_at_the_windows_end(
    rabbit_factory: Callable[[], Awaitable[RabbitMQTransport]], naming: Naming
) -> None:
    from choreo.errors import TransportError
    from choreo.transport.amqp import frames

    transport = await rabbit_factory()
    transport.ack_window_s = 60.0
    queue = QueueSpec(f"{naming.queue_prefix}closed", {"x-queue-type": "quorum"}, ("a.b",))
    await transport.declare(Topology(naming.exchange, (queue,)))
    await transport.publish(OutgoingMessage(naming.exchange, "a.b", b"x", message_id="m"))
    outcome: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    async def handler(delivery: Delivery) -> None:
        try:
            await delivery.ack()
        except TransportError as exc:
            outcome.set_result(exc)
        else:
            outcome.set_result(None)

    sub = await transport.subscribe(queue.name, handler, prefetch=64)
    channel = sub._channel  # type: ignore[attr-defined]
    await wait_for(lambda: bool(sub._acks.waiters), within=10, what="the ack held")  # type: ignore[attr-defined]
    # A channel error of our own making: an ack for a tag the broker never sent (406), written
    # straight to the socket so that the held ack does not ride along with it.
    channel.connection._write_now(frames.encode_ack(channel.number, 424242))
    async with asyncio.timeout(10):  # far less than the window
        result = await outcome
    assert isinstance(result, TransportError)
    await wait_for(lambda: not channel.is_open, within=5, what="the channel closed")
