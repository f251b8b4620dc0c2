"""The Node.js example of docs/publishing.md publishes events a choreo worker handles."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from choreo import Agent, Context, Settings, Worker
from choreo.testing import wait_for
from choreo.transport.rabbitmq import RabbitMQTransport

from ..conftest import SECRET
from .test_raw_publish import RawOrderPlaced

ROOT = Path(__file__).resolve().parents[2]
# Where `npm install --prefix bench/.node amqplib` puts it: .ci/run does that, and so does
# bench/run.py for its Node.js ceiling, so one install serves both.
NODE_PATH = os.environ.get("CHOREO_TEST_NODE_PATH", str(ROOT / "bench/.node/node_modules"))
pytestmark = [
    pytest.mark.rabbitmq,
    pytest.mark.skipif(
        shutil.which("node") is None or not (Path(NODE_PATH) / "amqplib").is_dir(),
        reason=f"needs node and amqplib in {NODE_PATH}: npm install --prefix bench/.node amqplib",
    ),
]


async def test_node_example_publishes_an_event_choreo_handles(
    rabbit_factory: Callable[[], Awaitable[RabbitMQTransport]], settings: Settings, amqp_url: str
) -> None:
    handled: list[tuple[str, str]] = []
    agent: Agent[None] = Agent("nodesink")

    @agent.on(RawOrderPlaced)
    async def on_order(event: RawOrderPlaced, ctx: Context[None]) -> None:
        handled.append((ctx.event_id, event.order_id))

    worker = Worker([agent], settings=settings, transport=await rabbit_factory())
    await worker.start()
    try:
        url = amqp_url[:-1] if amqp_url.endswith("/") else amqp_url
        proc = await asyncio.create_subprocess_exec(
            "node", str(ROOT / "docs/examples/publish.js"), url, settings.naming.exchange,
            env={**os.environ, "SECRET": SECRET, "KID": "k1", "NODE_PATH": NODE_PATH},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        await wait_for(lambda: handled == [(out.decode().strip(), "o-node-1")], within=10, what="the Node event")
        assert worker.runtimes[0].stats.dead_lettered_total == 0
    finally:
        await worker.stop()
