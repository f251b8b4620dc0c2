"""The RabbitMQ subscription restores its own consumer: after a channel error, a dropped
connection, and a broker-side cancel when its queue is deleted and declared again."""

from __future__ import annotations

import asyncio
import secrets
import shutil
from asyncio.subprocess import PIPE
from collections.abc import Awaitable, Callable

import pytest

from choreo.testing import wait_for
from choreo.topology import Naming, QueueSpec, Topology
from choreo.transport import Delivery, OutgoingMessage
from choreo.transport.amqp.frames import encode_ack
from choreo.transport.rabbitmq import RabbitMQTransport

from ..conftest import RabbitPool

Factory = Callable[[], Awaitable[RabbitMQTransport]]


class Bodies:
    def __init__(self) -> None:
        self.seen: list[bytes] = []

    async def __call__(self, delivery: Delivery) -> None:
        self.seen.append(delivery.body)
        await delivery.ack()


async def _setup(factory: Factory, naming: Naming, suffix: str) -> tuple[RabbitMQTransport, QueueSpec, Bodies, object]:
    transport = await factory()
    queue = QueueSpec(name=f"{naming.queue_prefix}{suffix}", arguments={"x-queue-type": "quorum"}, bindings=("a.b",))
    await transport.declare(Topology(naming.exchange, (queue,)))
    bodies = Bodies()
    sub = await transport.subscribe(queue.name, bodies, prefetch=10)
    await transport.publish(OutgoingMessage(naming.exchange, "a.b", b"1"))
    await wait_for(lambda: bodies.seen == [b"1"], what="the first delivery")
    return transport, queue, bodies, sub


async def _still_consumes(transport: RabbitMQTransport, naming: Naming, bodies: Bodies, sub: object) -> None:
    await wait_for(sub.is_attached, within=15, what="the consumer to be restored")  # type: ignore[attr-defined]
    await transport.publish(OutgoingMessage(naming.exchange, "a.b", b"2"))
    await wait_for(lambda: b"2" in bodies.seen, within=15, what="a delivery after the restore")


async def test_consumer_comes_back_after_a_channel_error(rabbit_factory: Factory, naming: Naming) -> None:
    transport, _, bodies, sub = await _setup(rabbit_factory, naming, "chan")
    channel = sub._channel  # type: ignore[attr-defined]
    # Acking a tag the broker never delivered is a channel error: the broker closes the channel.
    channel.send(encode_ack(channel.number, 999_999))
    await wait_for(lambda: not channel.is_open, what="the broker to close the channel")
    await _still_consumes(transport, naming, bodies, sub)
    assert sub._channel is not channel  # type: ignore[attr-defined]


async def test_consumer_comes_back_after_the_broker_closes_the_connection(amqp_url: str, naming: Naming) -> None:
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        pytest.skip("rabbitmqctl not available to close a connection from the broker side")
    name = f"choreo-tests-restore-{secrets.token_hex(4)}"
    pool = RabbitPool(amqp_url)

    async def named() -> RabbitMQTransport:
        transport = RabbitMQTransport(amqp_url, connection_name=name)
        await transport.connect()
        pool.cleanup.track(transport)
        pool.opened.append(transport)
        return transport

    try:
        transport, _, bodies, sub = await _setup(named, naming, "conn")
        first = transport._link.conn
        await _close_connection_named(ctl, name)
        # Reconnecting starts at once, so the link may be up again before a poll sees it down.
        await wait_for(lambda: transport._link.conn is not first, what="the connection to be replaced")
        await _still_consumes(transport, naming, bodies, sub)
    finally:
        await pool.aclose()


async def _close_connection_named(ctl: str, name: str) -> None:
    # Tab-separated rows: the pid in the form close_connection takes, then the properties.
    listing = await asyncio.create_subprocess_exec(
        ctl, "list_connections", "pid", "client_properties", "-q", stdout=PIPE, stderr=PIPE
    )
    out, err = await listing.communicate()
    assert listing.returncode == 0, err.decode()
    pids = [line.split("\t", 1)[0] for line in out.decode().splitlines() if f'"{name}"' in line]
    assert pids, f"no connection named {name!r}"
    for pid in pids:
        closing = await asyncio.create_subprocess_exec(ctl, "close_connection", pid, "test", stdout=PIPE, stderr=PIPE)
        out, err = await closing.communicate()
        assert closing.returncode == 0, (out + err).decode()


async def test_consumer_comes_back_when_its_deleted_queue_is_declared_again(
    rabbit_factory: Factory, naming: Naming
) -> None:
    transport, queue, bodies, sub = await _setup(rabbit_factory, naming, "gone")
    await transport.delete_queue(queue.name)  # the broker cancels the consumer
    await wait_for(lambda: _not(sub.is_attached), what="the consumer to be reported detached")  # type: ignore[attr-defined]
    await transport.declare(Topology(naming.exchange, (queue,)))
    await _still_consumes(transport, naming, bodies, sub)
    assert bodies.seen == [b"1", b"2"]


async def _not(check: Callable[[], Awaitable[bool]]) -> bool:
    return not await check()
