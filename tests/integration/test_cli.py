"""The ``choreo`` command as users run it: real processes, real signals, real broker."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from agents import inventory
from choreo import Settings
from choreo.observability.heartbeat import control_exchange
from choreo.runtime import topology_for
from choreo.testing import wait_for
from choreo.topology import QueueSpec, Topology
from choreo.transport.rabbitmq import RabbitMQTransport

from ..conftest import SECRET

pytestmark = pytest.mark.rabbitmq

CHOREO = [sys.executable, "-m", "choreo"]
ROOT = Path(__file__).resolve().parents[2]


def cli_env(settings: Settings, amqp_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "CHOREO_AMQP_URL": amqp_url,
        "CHOREO_SIGNING_KEYS": f"k1={SECRET}",
        "CHOREO_EXCHANGE": settings.naming.exchange,
        "CHOREO_QUEUE_PREFIX": settings.naming.queue_prefix,
        "CHOREO_STATE_DIR": str(settings.state_dir),
    }


async def run_cli(*args: str, env: dict[str, str], limit_s: float = 120) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *CHOREO, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), limit_s)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_worker_handles_published_events_and_exits_0_on_sigterm(
    rabbit_factory: Callable[[], Awaitable[RabbitMQTransport]], settings: Settings, amqp_url: str
) -> None:
    env = cli_env(settings, amqp_url)
    observer = await rabbit_factory()
    # A sink bound to what inventory emits, declared first so nothing is missed.
    sink = f"{settings.naming.queue_prefix}sink"
    await observer.declare(Topology(settings.naming.exchange, (QueueSpec(sink, {}, ("inventory.*",)),)))
    # Declare the worker's queues through the tracked transport too, so the test cleans them up.
    await observer.declare(topology_for(inventory.agent, settings))
    await observer.declare(Topology(control_exchange(settings.naming)))  # where the worker's heartbeats go

    proc = await asyncio.create_subprocess_exec(
        *CHOREO, "worker", "agents.inventory:agent", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        payload = '{"order_id":"o-cli-1","customer_id":"c-1","country":"DE","items":[{"sku":"a","qty":1}],"total_cents":100,"currency":"EUR"}'  # noqa: E501
        code, out, err = await run_cli("publish", "order.placed", payload, "--source", "cli-test", env=env)
        assert code == 0, err
        event_id = out.strip()
        assert len(event_id) == 36

        got: list[bytes] = []

        async def received() -> bool:
            delivery = await observer.get(sink)
            if delivery is not None:
                got.append(delivery.body)
                await delivery.ack()
            return bool(got)

        await wait_for(received, within=20, what="inventory's answer in the sink")
        assert b'"type":"inventory.reserved"' in got[0]
        assert f'"causation_id":"{event_id}"'.encode() in got[0]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err_bytes = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err_bytes.decode()[-2000:]
    assert "worker stopping" in err_bytes.decode()


async def test_worker_rejects_bad_agent_spec_with_clear_error(settings: Settings, amqp_url: str) -> None:
    code, _, err = await run_cli("worker", "agents.saga:plan_orders", env=cli_env(settings, amqp_url))
    assert code == 2
    assert "not a choreo.Agent" in err


async def test_publish_rejects_non_object_json(settings: Settings, amqp_url: str) -> None:
    code, _, err = await run_cli("publish", "order.placed", "[1, 2]", env=cli_env(settings, amqp_url))
    assert code == 2
    assert "JSON object" in err


@pytest.mark.parametrize("broker", ["rabbitmq", "memory"])
async def test_demo_ends_every_order_correctly(broker: str, settings: Settings, amqp_url: str) -> None:
    env = cli_env(settings, amqp_url)
    if broker == "memory":
        env["CHOREO_AMQP_URL"] = "amqp://guest:guest@127.0.0.1:1/"  # nothing listens there
    code, out, err = await run_cli("demo", "--orders", "60", env=env)
    assert code == 0, out + err
    assert "Every order ended exactly once" in out
    if broker == "memory":
        assert "in-memory broker" in out
    else:
        assert "RabbitMQ at" in out


async def test_schemas_check_passes_on_the_checked_in_files() -> None:
    code, out, err = await run_cli("schemas", "--check", "--out", str(ROOT / "schemas"), env=dict(os.environ))
    assert code == 0, out + err
    assert "up to date" in out
