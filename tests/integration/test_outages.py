"""Infrastructure failures: unconfirmed publishes, a broker that vanishes, missing keys."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
from collections.abc import AsyncIterator, Sequence

import pytest

from choreo import Agent, ConfigError, Context, Event, Keyring, Publisher, Settings, Worker
from choreo.errors import PublishNotConfirmed
from choreo.testing import wait_for
from choreo.transport import InMemoryBroker, InMemoryTransport, OutgoingMessage
from choreo.transport.rabbitmq import RabbitMQTransport


class Tick(Event, type="clock.ticked"):
    n: int


class Tock(Event, type="clock.tocked"):
    n: int


class NeverConfirms(InMemoryTransport):
    """Every publish of emitted events fails, as during a long broker-side outage."""

    async def publish_many(self, messages: Sequence[OutgoingMessage]) -> None:
        raise PublishNotConfirmed("simulated outage")


async def test_unconfirmed_emits_back_off_then_dead_letter_with_headers_before_the_delivery_limit(
    settings: Settings,
) -> None:
    settings = dataclasses.replace(settings, delivery_limit=3)
    transport = NeverConfirms(InMemoryBroker())
    await transport.connect()
    runs: list[float] = []
    agent: Agent[None] = Agent("ticker")

    @agent.on(Tick)
    async def tick(event: Tick, ctx: Context[None]) -> Tock:
        runs.append(asyncio.get_running_loop().time())
        return Tock(n=event.n)

    worker = Worker([agent], settings=settings, transport=transport)
    await worker.start()
    try:
        async with Publisher(transport=transport, settings=settings, source="t") as publisher:
            await publisher.publish(Tick(n=1))
        runtime = worker.runtimes[0]
        await wait_for(lambda: runtime.stats.dead_lettered["retries_exhausted"] == 1, within=10, what="dead-letter")
        dead = await transport.get(settings.naming.agent_queues("ticker").dlq)
    finally:
        await worker.stop()
    assert dead is not None
    assert dead.headers["x-choreo-reason"] == "retries_exhausted"
    assert "emitted events not confirmed" in str(dead.headers["x-choreo-error"])
    assert len(runs) == 3  # the delivery limit, not more: the broker never drops it bare
    gaps = [b - a for a, b in itertools.pairwise(runs)]
    assert all(gap >= 0.09 for gap in gaps), gaps  # backed off, no hot loop


async def test_worker_without_keys_refuses_to_start(settings: Settings) -> None:
    transport = InMemoryBroker().transport()
    await transport.connect()
    agent: Agent[None] = Agent("keyless")

    @agent.on(Tick)
    async def tick(event: Tick, ctx: Context[None]) -> None:
        return None

    with pytest.raises(ConfigError, match="no verification keys"):
        await Worker([agent], settings=dataclasses.replace(settings, keyring=Keyring()), transport=transport).start()
    verify_only = Keyring(None, list(settings.keyring._verifiers.values()))
    with pytest.raises(ConfigError, match="no signing key"):
        await Worker([agent], settings=dataclasses.replace(settings, keyring=verify_only), transport=transport).start()


class Proxy:
    """A TCP proxy to the broker that the test can cut, as a network partition would."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers.update({writer, up_writer})

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def cut(self) -> None:
        """Stop accepting and drop every connection: the broker is unreachable."""
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()


@pytest.fixture
async def proxy(amqp_url: str) -> AsyncIterator[tuple[Proxy, str]]:
    from urllib.parse import urlparse

    parsed = urlparse(amqp_url)
    proxy = Proxy(parsed.hostname or "127.0.0.1", parsed.port or 5672)
    port = await proxy.start()
    yield proxy, f"amqp://{parsed.username}:{parsed.password}@127.0.0.1:{port}/"
    if proxy.server is not None:
        proxy.server.close()


@pytest.mark.rabbitmq
@pytest.mark.parametrize("stop_at_once", [True, False], ids=["stop-while-reconnecting", "stop-once-disconnected"])
async def test_shutdown_during_a_broker_outage_finishes_within_the_grace_period(
    proxy: tuple[Proxy, str], settings: Settings, amqp_url: str, stop_at_once: bool
) -> None:
    cut, url = proxy
    agent: Agent[None] = Agent("stopper")

    @agent.on(Tick)
    async def tick(event: Tick, ctx: Context[None]) -> None:
        return None

    transport = RabbitMQTransport(url, timeout=2)
    await transport.connect()
    worker = Worker([agent], settings=dataclasses.replace(settings, shutdown_grace_s=2), transport=transport)
    try:
        await worker.start()
        assert await worker.is_ready()
        await cut.cut()
        if not stop_at_once:
            await wait_for(lambda: not transport.connected, within=10, what="the connection to drop")
            assert not await worker.is_ready()
        finished = await asyncio.wait_for(worker.stop(), 15)  # it used to hang here for ever
        assert finished  # nothing was in flight
    finally:
        await asyncio.wait_for(transport.close(), 15)
        admin = RabbitMQTransport(amqp_url)
        await admin.connect()
        for queue in worker.runtimes[0].topology.queues:
            await admin.delete_queue(queue.name)
        await admin.delete_exchange(settings.naming.exchange)
        await admin.delete_exchange(f"{settings.naming.exchange}.control")  # the heartbeats'
        await admin.close()
