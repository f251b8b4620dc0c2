"""Shared fixtures.

Broker: ``CHOREO_TEST_AMQP_URL`` (default: the local RabbitMQ); if unreachable, a
testcontainers RabbitMQ where a Docker engine exists; otherwise RabbitMQ tests skip with the
reason. Each test gets its own exchange and queue prefix, deleted afterwards.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from choreo import Keyring, Naming, Settings
from choreo.observability import tracing
from choreo.topology import Topology
from choreo.transport import InMemoryBroker, Transport
from choreo.transport.rabbitmq import RabbitMQTransport

SECRET = "test-secret"


async def turns(n: int = 5) -> None:
    """Let ``n`` event-loop turns pass: to show something did *not* happen in them (a held ack
    or commit), where waiting on a condition would only prove the opposite."""
    for _ in range(n):
        await asyncio.sleep(0)


def free_port() -> int:
    """A TCP port free on loopback right now (for a worker's HTTP port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _reachable(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "localhost", parsed.port or 5672), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    url = os.environ.get("CHOREO_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    if _reachable(url):
        yield url
        return
    try:
        from testcontainers.rabbitmq import RabbitMqContainer

        container = RabbitMqContainer("rabbitmq:3.13-management")
        container.start()
    except Exception as exc:  # no Docker engine, no image, ...
        pytest.skip(f"no RabbitMQ at {url} and no Docker engine for testcontainers ({exc!r})")
    try:
        host, port = container.get_container_host_ip(), container.get_exposed_port(5672)
        yield f"amqp://guest:guest@{host}:{port}/"
    finally:
        container.stop()


@pytest.fixture
def keyring() -> Keyring:
    return Keyring.hmac(("k1", SECRET))


@pytest.fixture
def naming() -> Naming:
    run = secrets.token_hex(4)
    return Naming(exchange=f"test-{run}.events", queue_prefix=f"test-{run}.")


@pytest.fixture
def settings(tmp_path: Path, keyring: Keyring, naming: Naming) -> Settings:
    return Settings(keyring=keyring, naming=naming, state_dir=tmp_path / "state", shutdown_grace_s=10)


class _Cleanup:
    """Remembers what a test declared so it can be deleted afterwards."""

    def __init__(self) -> None:
        self.queues: set[str] = set()
        self.exchanges: set[str] = set()

    def track(self, transport: Transport) -> Transport:
        declare = transport.declare

        async def recording_declare(topology: Topology) -> None:
            self.exchanges.add(topology.exchange)
            self.queues.update(q.name for q in topology.queues)
            await declare(topology)

        transport.declare = recording_declare  # type: ignore[method-assign]
        return transport

    async def run(self, url: str) -> None:
        if not self.queues and not self.exchanges:
            return
        admin = RabbitMQTransport(url, connection_name="choreo-tests-cleanup")
        await admin.connect()
        try:
            for queue in self.queues:
                await admin.delete_queue(queue)
            for exchange in self.exchanges:
                await admin.delete_exchange(exchange)
        finally:
            await admin.close()


class RabbitPool:
    """Connected RabbitMQ transports whose declarations are deleted at :meth:`aclose`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.cleanup = _Cleanup()
        self.opened: list[RabbitMQTransport] = []

    async def make(self) -> RabbitMQTransport:
        transport = RabbitMQTransport(self.url, connection_name="choreo-tests")
        await transport.connect()
        self.cleanup.track(transport)
        self.opened.append(transport)
        return transport

    async def aclose(self) -> None:
        for transport in self.opened:
            await transport.close()
        await self.cleanup.run(self.url)


@pytest.fixture
async def rabbit_factory(amqp_url: str) -> AsyncIterator[Callable[[], Awaitable[RabbitMQTransport]]]:
    pool = RabbitPool(amqp_url)
    yield pool.make
    await pool.aclose()


@pytest.fixture(params=["memory", "rabbitmq"])
def transport_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def transport_factory(
    transport_kind: str, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[[], Awaitable[Transport]]]:
    """Connections to one broker of the parametrized kind (several share one broker)."""
    if transport_kind == "memory":
        broker = InMemoryBroker()
        opened: list[Transport] = []

        async def make_memory() -> Transport:
            transport = broker.transport()
            await transport.connect()
            opened.append(transport)
            return transport

        yield make_memory
        for transport in opened:
            await transport.close()
        return
    pool = RabbitPool(request.getfixturevalue("amqp_url"))
    yield pool.make
    await pool.aclose()


@pytest.fixture
async def transport(transport_factory: Callable[[], Awaitable[Transport]]) -> Transport:
    return await transport_factory()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """choreo traced into an in-memory exporter for the test (tracing off again after it)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.set_tracer_provider(provider)
    yield exporter
    tracing.set_tracer_provider(None)
    provider.shutdown()
