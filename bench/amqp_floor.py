"""What aiormq alone costs to consume choreo's messages: the floor under choreo's consume path.

    python bench/amqp_floor.py [N]

Publishes N signed choreo events (same event, signing and properties as the consume benchmark)
to a scratch quorum queue, then drains it with a bare aiormq consumer that does nothing but
``orjson.loads`` the body and ack every 64th delivery with ``multiple=True``, and prints its
throughput and CPU µs per message. choreo's messages carry more properties and four headers
(the signature and ``traceparent``), so this floor sits above ``tuned_aiopika.py``'s. The
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
from choreo.transport.rabbitmq import RabbitMQTransport

URL = "amqp://guest:guest@127.0.0.1:5672/"


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


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

        cpu0, t0 = cpu_s(), time.perf_counter()
        await raw.basic_consume(queue, on_message)
        await done.wait()
        elapsed, cpu = time.perf_counter() - t0, cpu_s() - cpu0
        await connection.close()
        print(f"aiormq floor on choreo messages: consume {n / elapsed:,.0f}/s, CPU {cpu / n * 1e6:.0f} µs/msg, N={n:,}")
    finally:
        await admin.delete_queue(queue)
        await admin.delete_exchange(exchange)
        await admin.close()


if __name__ == "__main__":
    choreo.log.configure(json=True, level=30)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20000))
