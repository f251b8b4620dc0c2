"""A real worker process's HTTP port and heartbeats on the real broker: /metrics counts what it
handles; /readyz fails while the broker has closed its connection and recovers by itself; events
published meanwhile are handled; `choreo agents` lists it."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable

import pytest

from agents.saga import plan_orders
from choreo import Publisher, Settings
from choreo.testing import wait_for
from choreo.transport.rabbitmq import RabbitMQTransport

from ..conftest import SECRET, free_port
from ..unit.test_observability import http_get, sample
from .conftest import WorkerProcess, close_all_connections, need_rabbitmqctl

pytestmark = pytest.mark.rabbitmq


PORT = free_port()


@pytest.fixture
def worker_env() -> dict[str, str]:
    return {"CHOREO_HTTP_PORT": str(PORT), "CHOREO_HEARTBEAT_S": "0.5"}


async def get(path: str) -> tuple[int, str]:
    try:
        return await http_get(PORT, path)
    except OSError:  # not listening (yet)
        return 0, ""


async def handled() -> float:
    _, text = await get("/metrics")
    return sample(text, "choreo_messages_handled_total", agent="inventory", type="order.placed") or 0.0


async def test_readyz_fails_while_the_broker_drops_the_worker_and_recovers_by_itself(
    workers: Callable[[str], Awaitable[WorkerProcess]],
    rabbit_factory: Callable[[], Awaitable[RabbitMQTransport]],
    settings: Settings,
    amqp_url: str,
) -> None:
    need_rabbitmqctl()
    worker = await workers("agents.inventory:agent")
    assert (await get("/healthz"))[0] == 200
    await wait_for(lambda: _status("/readyz", 200), within=10, what="/readyz 200")
    plans = plan_orders(20, seed=11, run_id="hz-")
    transport = await rabbit_factory()
    async with Publisher(transport=transport, settings=settings, source="test") as publisher:
        for plan in plans[:10]:
            await publisher.publish(plan.event)
        await wait_for(lambda: _at_least(10), within=20, what="10 handled in /metrics")

        # `choreo agents` hears the worker's heartbeat.
        env = {
            **os.environ,
            "CHOREO_AMQP_URL": amqp_url,
            "CHOREO_SIGNING_KEYS": f"k1={SECRET}",
            "CHOREO_EXCHANGE": settings.naming.exchange,
            "CHOREO_QUEUE_PREFIX": settings.naming.queue_prefix,
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "choreo", "agents", "--wait", "2", "--json", env=env, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0
        beats = [json.loads(line) for line in out.decode().splitlines()]
        assert [(b["agent"], b["ready"], b["verified"]) for b in beats] == [("inventory", True, True)]
        assert beats[0]["handled"] >= 10

        # The broker drops every connection. The worker reconnects at once (a poll of /readyz
        # rarely catches the 503 in between; tests/unit covers it): its log shows both steps.
        await close_all_connections("readyz test")
        await wait_for(
            lambda: b"reconnected to RabbitMQ" in worker.log.read_bytes(), within=20, what="the worker to reconnect"
        )
        assert b"connection to RabbitMQ lost" in worker.log.read_bytes()
        assert (await get("/healthz"))[0] == 200  # alive: a restart would not help
        for plan in plans[10:]:
            await publisher.publish(plan.event)  # our own connection recovers and confirms
        await wait_for(lambda: _status("/readyz", 200), within=60, what="/readyz 200 again, by itself")
        await wait_for(lambda: _at_least(20), within=30, what="events published meanwhile handled")
    _, text = await get("/metrics")
    assert sample(text, "choreo_consumers_attached", agent="inventory") == 1
    assert sample(text, "choreo_ready") == 1
    print(f"\nreadyz: handled={await handled():.0f} of 20; ready again after close_all_connections")


async def _status(path: str, expected: int) -> bool:
    return (await get(path))[0] == expected


async def _at_least(n: int) -> bool:
    return await handled() >= n
