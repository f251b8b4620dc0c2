"""Topology drift: reported as a readable diff by the CLI, never a crash loop in the worker."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
from collections.abc import Awaitable, Callable

import pytest

from agents import inventory
from choreo import Settings
from choreo.management import management_for
from choreo.runtime import topology_for
from choreo.testing import wait_for
from choreo.topology import QueueSpec, Topology
from choreo.transport.rabbitmq import RabbitMQTransport

from .test_cli import CHOREO, cli_env, run_cli

pytestmark = pytest.mark.rabbitmq


async def test_drift_is_shown_applied_and_survived(
    rabbit_factory: Callable[[], Awaitable[RabbitMQTransport]], settings: Settings, amqp_url: str
) -> None:
    env = cli_env(settings, amqp_url)
    code, out, err = await run_cli("topology", "show", "agents.inventory:agent", env=env)
    assert code == 1  # nothing declared yet
    assert "missing" in out

    code, out, err = await run_cli("topology", "apply", "agents.inventory:agent", env=env)
    assert code == 0, err
    admin = await rabbit_factory()
    await admin.declare(topology_for(inventory.agent, settings))  # tracked for cleanup; a no-op now
    code, out, err = await run_cli("topology", "show", "agents.inventory:agent", "--json", env=env)
    assert code == 0, out + err
    rows = json.loads(out)["inventory"]
    assert all(row["exists"] and not row["drift"] for row in rows)

    # Someone re-creates the agent's queue with another delivery limit.
    for queue in topology_for(inventory.agent, settings).queues:
        await admin.delete_queue(queue.name)
    await admin.declare(topology_for(inventory.agent, dataclasses.replace(settings, delivery_limit=3)))

    code, out, err = await run_cli("topology", "show", "agents.inventory:agent", env=env)
    assert code == 1
    assert "DRIFT" in out
    assert "x-delivery-limit: declared 10, existing 3" in out
    code, out, err = await run_cli("topology", "apply", "agents.inventory:agent", env=env)
    assert code == 1
    assert "x-delivery-limit" in err
    assert "declared 10, existing 3" in err

    # A worker meeting the drift stays up, not consuming, says why, and stops cleanly.
    proc = await asyncio.create_subprocess_exec(
        *CHOREO, "worker", "agents.inventory:agent", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    seen: list[bytes] = []

    async def reported() -> bool:
        line = await proc.stderr.readline()  # type: ignore[union-attr]
        seen.append(line)
        return b"topology differs" in line

    await wait_for(reported, within=30, what="the worker to report the drift")
    assert b"x-delivery-limit" in seen[-1]
    assert proc.returncode is None  # still running: no crash loop
    proc.send_signal(signal.SIGTERM)
    await asyncio.wait_for(proc.wait(), 30)
    assert proc.returncode == 0


async def test_management_api_shows_every_differing_argument_and_binding(
    rabbit_factory: Callable[[], Awaitable[RabbitMQTransport]], settings: Settings, amqp_url: str
) -> None:
    if not await management_for(amqp_url).available():
        pytest.skip("RabbitMQ management API not reachable (rabbitmq-plugins enable rabbitmq_management)")
    env = cli_env(settings, amqp_url)
    admin = await rabbit_factory()
    drifted = dataclasses.replace(settings, delivery_limit=4)
    topo = topology_for(inventory.agent, drifted)
    main = topo.queues[0]
    # The queue exists with two other arguments and without one of its bindings, plus a stray one.
    odd = dict(main.arguments, **{"x-max-length": 1000})
    await admin.declare(Topology(topo.exchange, (QueueSpec(main.name, odd, ("order.placed", "stray.key")),)))
    code, out, _ = await run_cli("topology", "show", "agents.inventory:agent", env=env)
    assert code == 1
    line = next(x for x in out.splitlines() if x.startswith(f"DRIFT {main.name}:"))
    assert "x-delivery-limit: declared 10, existing 4" in line
    assert "x-max-length: declared None, existing 1000" in line
    assert "binding payment.failed: declared, missing" in line
    assert "binding shipping.failed: declared, missing" in line
    assert "binding stray.key: not declared, exists" in line
    assert "note: the management API did not answer" not in out
