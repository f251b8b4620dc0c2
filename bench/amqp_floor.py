"""What the AMQP client alone costs to consume choreo's messages: aiormq (which choreo used
before it had its own client) and choreo's own client (``choreo.transport.amqp``).

    python bench/amqp_floor.py [N]

Publishes N signed choreo events (same event, signing and properties as the consume benchmark)
to a scratch quorum queue, then drains it with a bare consumer that does nothing but
``orjson.loads`` the body and ack every 64th delivery with ``multiple=True``, and prints its
throughput and CPU µs per message; then the same again with choreo's client. choreo's messages
carry more properties and four headers (the signature and ``traceparent``), so the aiormq
floor sits above ``tuned_aiopika.py``'s. The
queue and exchange are deleted afterwards.
"""

from __future__ import annotations

import asyncio
import resource
import secrets
import sys
import time
from pathlib import Path

import aio_pika
import aiormq.abc
import orjson
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from choreo_client import EVENT

import choreo
from choreo.topology import QueueSpec, Topology
from choreo.transport.amqp.connection import Connection, Endpoint, Message
from choreo.transport.amqp.frames import encode_ack
from choreo.transport.rabbitmq import RabbitMQTransport

URL = "amqp://guest:guest@127.0.0.1:5672/"


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def drain_aiormq(queue: str, n: int) -> None:
    connection = await aio_pika.connect(URL)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=256)
    raw = channel.channel
    done, count = asyncio.Event(), 0

    async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
        nonlocal count
        orjson.loads(message.body)
        count += 1
        if count % 64 == 0 or count == n:
            await raw.basic_ack(message.delivery_tag or 0, multiple=True)
        if count == n:
            done.set()

    await raw.basic_consume(queue, on_message)
    await done.wait()
    await connection.close()


async def drain_choreo(queue: str, n: int) -> None:
    conn = await Connection.open(Endpoint.from_url(URL), name="choreo-bench-floor", within=10)
    channel = await conn.channel()
    await channel.qos(256)
    done, count = asyncio.Event(), 0

    def on_message(message: Message) -> None:  # no task per delivery: the floor of the client itself
        nonlocal count
        orjson.loads(message.body)
        message.properties.headers  # noqa: B018  (decoded already; read as the runtime does)
        count += 1
        if count % 64 == 0 or count == n:
            channel.send(encode_ack(channel.number, message.delivery_tag, multiple=True))
        if count == n:
            done.set()

    await channel.consume(queue, "floor", on_message)
    await done.wait()
    await conn.close()


async def main(n: int) -> None:
    run = secrets.token_hex(3)
    exchange, queue = f"bench-floor-{run}.events", f"bench-floor-{run}.q"
    settings = choreo.Settings(
        amqp_url=URL, naming=choreo.Naming(exchange=exchange), keyring=choreo.Keyring.hmac(("bench", "s"))
    )
    admin = RabbitMQTransport(URL, connection_name="choreo-bench-floor")
    await admin.connect()
    try:
        spec = QueueSpec(queue, arguments={"x-queue-type": "quorum"}, bindings=("order.#",))
        await admin.declare(Topology(exchange, (spec,)))
        async with choreo.Publisher(transport=admin, settings=settings, source="bench") as publisher:
            for start in range(0, n, 500):
                await asyncio.gather(*(publisher.publish(EVENT) for _ in range(min(500, n - start))))
        for label, drain in (("aiormq", drain_aiormq), ("choreo's AMQP client", drain_choreo)):
            if label != "aiormq":
                async with choreo.Publisher(transport=admin, settings=settings, source="bench") as publisher:
                    for start in range(0, n, 500):
                        await asyncio.gather(*(publisher.publish(EVENT) for _ in range(min(500, n - start))))
            cpu0, t0 = cpu_s(), time.perf_counter()
            await drain(queue, n)
            elapsed, cpu = time.perf_counter() - t0, cpu_s() - cpu0
            rate, per = n / elapsed, cpu / n * 1e6
            print(f"{label} floor on choreo messages: consume {rate:,.0f}/s, CPU {per:.0f} µs/msg, N={n:,}")
    finally:
        await admin.delete_queue(queue)
        await admin.delete_exchange(exchange)
        await admin.close()


if __name__ == "__main__":
    choreo.log.configure(json=True, level=30)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20000))
