"""``connection.blocked``: during a broker resource alarm publishes wait (bounded), acks go on.

A real alarm (``rabbitmqctl set_vm_memory_high_watermark``) would block every client of the
shared local broker, so the broker's ``connection.blocked`` / ``connection.unblocked`` frames
are fed into the client's connection as if read from its socket; everything else runs
against the real broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable

import pamqp.frame
import pytest
from pamqp import commands as cmd

from choreo.errors import PublishNotConfirmed
from choreo.testing import wait_for
from choreo.topology import QueueSpec, Topology
from choreo.transport import Delivery, OutgoingMessage
from choreo.transport.rabbitmq import RabbitMQTransport

from ..conftest import turns

pytestmark = pytest.mark.rabbitmq


def broker_says(transport: RabbitMQTransport, method: cmd.Connection.Blocked | cmd.Connection.Unblocked) -> None:
    conn = transport._link.conn
    assert conn is not None
    conn.data_received(pamqp.frame.marshal(method, 0))


@contextlib.asynccontextmanager
async def connected(amqp_url: str, *, publish_timeout: float) -> AsyncIterator[RabbitMQTransport]:
    """A transport of its own with a short ``publish_timeout``, closed on the way out."""
    transport = RabbitMQTransport(amqp_url, timeout=publish_timeout)
    await transport.connect()
    try:
        yield transport
    finally:
        await transport.close()


async def setup(
    rabbit_factory: Callable[[], Awaitable[RabbitMQTransport]],
) -> tuple[RabbitMQTransport, str, str]:
    """The admin transport (its declarations are cleaned up), an exchange and its queue."""
    admin = await rabbit_factory()
    name = f"choreo-blocked-{secrets.token_hex(4)}"
    await admin.declare(Topology(f"{name}.x", (QueueSpec(name, {}, ("t.#",)),)))
    return admin, f"{name}.x", name


async def test_a_publish_waits_while_the_broker_blocks_and_goes_out_when_it_unblocks(
    rabbit_factory: Callable[[], Awaitable[RabbitMQTransport]],
) -> None:
    admin, exchange, queue = await setup(rabbit_factory)
    transport = await rabbit_factory()
    await transport.publish(OutgoingMessage(exchange, "t.x", b"before"))  # the publish channel is open
    channel = transport._confirms.channel_now()
    assert channel is not None
    sent = channel.unconfirmed_mark()
    broker_says(transport, cmd.Connection.Blocked(reason="low on memory"))
    publish = asyncio.ensure_future(transport.publish(OutgoingMessage(exchange, "t.x", b"held")))
    await turns()  # with the channel open, nothing but the block stands between it and the socket
    assert not publish.done()
    assert channel.unconfirmed_mark() == sent  # not written
    broker_says(transport, cmd.Connection.Unblocked())
    await asyncio.wait_for(publish, 10)  # confirmed by the broker
    assert channel.unconfirmed_mark() == sent + 1

    async def both_queued() -> bool:
        return await admin.queue_depth(queue) == 2

    await wait_for(both_queued, within=10, what="both messages in the queue")


async def test_a_publish_blocked_past_the_timeout_fails_saying_why(
    rabbit_factory: Callable[[], Awaitable[RabbitMQTransport]], amqp_url: str
) -> None:
    admin, exchange, queue = await setup(rabbit_factory)
    async with connected(amqp_url, publish_timeout=0.5) as transport:
        broker_says(transport, cmd.Connection.Blocked(reason="low on disk"))
        with pytest.raises(PublishNotConfirmed, match=r"blocks publishing \(low on disk\)"):
            await transport.publish(OutgoingMessage(exchange, "t.x", b"never sent"))
        with pytest.raises(PublishNotConfirmed, match="blocks publishing"):  # moves to a DLQ wait the same way
            await transport.publish(OutgoingMessage("", queue, b"never sent", mandatory=True))
        assert await admin.queue_depth(queue) == 0


async def test_moves_queued_behind_a_blocked_one_each_keep_to_the_timeout(
    rabbit_factory: Callable[[], Awaitable[RabbitMQTransport]], amqp_url: str
) -> None:
    _, _, queue = await setup(rabbit_factory)
    async with connected(amqp_url, publish_timeout=1.0) as transport:
        broker_says(transport, cmd.Connection.Blocked(reason="low on memory"))
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def move(n: int) -> float:
            with pytest.raises(PublishNotConfirmed):
                await transport.publish(OutgoingMessage("", queue, str(n).encode(), mandatory=True))
            return loop.time() - started

        took = await asyncio.gather(*(move(n) for n in range(3)))
        # One at a time on their channel, yet each fails by its own deadline, not one timeout
        # after the one ahead of it (that was 1, 2 and 3 s).
        assert max(took) < 1.8, took


async def test_consuming_and_acking_go_on_while_publishing_is_blocked(
    rabbit_factory: Callable[[], Awaitable[RabbitMQTransport]],
) -> None:
    admin, exchange, queue = await setup(rabbit_factory)
    for n in range(3):
        await admin.publish(OutgoingMessage(exchange, "t.x", str(n).encode()))
    transport = await rabbit_factory()
    broker_says(transport, cmd.Connection.Blocked(reason="low on memory"))
    acked: list[bytes] = []

    async def on_delivery(delivery: Delivery) -> None:
        await delivery.ack()
        acked.append(delivery.body)

    # Prefetch 1: the broker sends the next delivery only once it has the previous one's ack,
    # so three deliveries prove that the acks reached it.
    sub = await transport.subscribe(queue, on_delivery, prefetch=1)
    await wait_for(lambda: len(acked) == 3, within=10, what="three deliveries acked while blocked")
    await sub.cancel()
    assert sorted(acked) == [b"0", b"1", b"2"]
