"""The blocking publisher, from plain threads with no event loop (as in a WSGI app)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from choreo import ChoreoError, Event, Settings, SyncPublisher, TransportError
from choreo.topology import QueueSpec, Topology
from choreo.transport.rabbitmq import RabbitMQTransport

pytestmark = pytest.mark.rabbitmq


class Signup(Event, type="user.signed_up"):
    user: str


def test_many_threads_publish_confirmed_signed_events(settings: Settings, amqp_url: str) -> None:
    sink = f"{settings.naming.queue_prefix}signups"

    async def declare() -> None:
        transport = RabbitMQTransport(amqp_url)
        await transport.connect()
        await transport.declare(Topology(settings.naming.exchange, (QueueSpec(sink, {}, ("user.*",)),)))
        await transport.close()

    asyncio.run(declare())
    ids: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    try:
        with SyncPublisher(amqp_url, source="web", settings=settings) as publisher:

            def request_handler(worker: int) -> None:
                try:
                    for i in range(25):
                        envelope = publisher.publish(Signup(user=f"u{worker}-{i}"))
                        with lock:
                            ids.append(envelope.id)
                except BaseException as exc:  # surfaced below
                    errors.append(exc)

            threads = [threading.Thread(target=request_handler, args=(w,)) for w in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
        assert errors == []
        assert len(set(ids)) == 100

        async def drain() -> list[str]:
            transport = RabbitMQTransport(amqp_url)
            await transport.connect()
            got = []
            while (delivery := await transport.get(sink)) is not None:
                settings.keyring.verify(delivery.body, delivery.headers)  # signed
                got.append(str(delivery.message_id))
                await delivery.ack()
            await transport.close()
            return got

        # publish() returned only after the broker confirmed: every event is already queued.
        assert sorted(asyncio.run(drain())) == sorted(ids)
    finally:

        async def cleanup() -> None:
            transport = RabbitMQTransport(amqp_url)
            await transport.connect()
            await transport.delete_queue(sink)
            await transport.delete_exchange(settings.naming.exchange)
            await transport.close()

        asyncio.run(cleanup())


def test_unreachable_broker_fails_clearly(settings: Settings) -> None:
    with pytest.raises(TransportError, match="cannot connect"):
        SyncPublisher("amqp://guest:guest@127.0.0.1:1/", source="web", settings=settings)


def test_a_closed_publisher_refuses_to_publish(settings: Settings, amqp_url: str) -> None:
    publisher = SyncPublisher(amqp_url, source="web", settings=settings)
    publisher.close()
    publisher.close()  # idempotent
    with pytest.raises(ChoreoError, match="closed"):
        publisher.publish(Signup(user="late"))
