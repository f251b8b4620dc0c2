"""Chaos on the real broker with separate worker processes: kill -9, dropped connections,
duplicates across competing replicas. Nothing may be lost, nothing done twice."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from agents.saga import ALL_SCENARIOS, SAGA_AGENTS, SagaRun, plan_orders
from choreo import Settings
from choreo.publisher import new_envelope, to_message
from choreo.testing import wait_for
from choreo.topology import QueueSpec, Topology
from choreo.transport.rabbitmq import RabbitMQTransport

from .conftest import WorkerProcess, close_all_connections, need_rabbitmqctl

pytestmark = pytest.mark.rabbitmq


async def saga_workers(start: Callable[[str], Awaitable[WorkerProcess]]) -> dict[str, WorkerProcess]:
    return {agent.name: await start(f"agents.{agent.name}:agent") for agent in SAGA_AGENTS}


def captured_orders(state_dir: Path) -> list[tuple[str, int]]:
    db = sqlite3.connect(state_dir / "payments.sqlite3")
    try:
        return db.execute(
            "SELECT order_id, COUNT(*) FROM charges WHERE status IN ('captured', 'refunded') GROUP BY order_id"
        ).fetchall()
    finally:
        db.close()


async def test_kill_9_a_worker_mid_run_loses_nothing_and_captures_once(
    workers: Callable[[str], Awaitable[WorkerProcess]],
    rabbit_factory: Callable[[], Awaitable[RabbitMQTransport]],
    settings: Settings,
) -> None:
    procs = await saga_workers(workers)
    plans = plan_orders(2000, seed=3, run_id="k9-", scenarios=ALL_SCENARIOS)
    run = SagaRun(await rabbit_factory(), settings, plans, in_process=False)
    kills = 0
    async with run:
        await run.publish_all(duplicate_every=50, inject_bad=False)
        await wait_for(lambda: run.ended >= 400, within=120, what="a fifth of the orders to end")
        # Mid-run: payments dies without any chance to ack, then comes back.
        procs["payments"].kill9()
        assert await procs["payments"].wait() == -signal.SIGKILL
        kills += 1
        ended_at_kill = run.ended
        assert ended_at_kill < len(plans), "the run finished before the kill; it proves nothing"
        await procs["payments"].start()
        await run.wait(timeout_s=240)
    report = run.finish()
    assert kills == 1
    assert report.problems == [], report.problems[:10]
    assert report.orders == 2000
    paid = sum(p.expected in ("completed", "shipping_failed") for p in plans)
    assert report.captures == paid
    # The payments agent's own books: one charge row per paid order (the primary key), no more.
    rows = captured_orders(settings.state_dir)
    assert len(rows) == paid
    assert all(count == 1 for _, count in rows)
    print(
        f"\nchaos kill-9: orders={report.orders} kills={kills} ended_at_kill={ended_at_kill} ended={report.ended} "
        f"duplicates_published={report.duplicates_published} captures={report.captures} (expected {paid}) "
        f"lost={report.orders - report.ended} elapsed={report.elapsed_s:.1f}s"
    )


async def test_broker_closing_every_connection_mid_run_loses_nothing(
    workers: Callable[[str], Awaitable[WorkerProcess]],
    rabbit_factory: Callable[[], Awaitable[RabbitMQTransport]],
    settings: Settings,
) -> None:
    need_rabbitmqctl()
    await saga_workers(workers)
    plans = plan_orders(1000, seed=5, run_id="cc-")
    run = SagaRun(await rabbit_factory(), settings, plans, in_process=False)
    async with run:
        # Paced, so the orders outlast the close: unpaced, a fast worker set can end all 1000
        # while rabbitmqctl is still starting, and the test would prove nothing.
        publishing = asyncio.create_task(run.publish_all(duplicate_every=50, inject_bad=False, rate=150))
        await wait_for(lambda: run.ended >= 100, within=120, what="the run to get going")
        await close_all_connections("chaos test")
        ended_at_close = run.ended
        assert not publishing.done(), "every order was published before the connections closed"
        await publishing
        await run.wait(timeout_s=240)
    report = run.finish()
    assert ended_at_close < len(plans), "the run finished before the connections closed"
    assert report.problems == [], report.problems[:10]
    print(
        f"\nchaos close_all_connections: orders={report.orders} ended_at_close={ended_at_close} ended={report.ended} "
        f"lost={report.orders - report.ended} elapsed={report.elapsed_s:.1f}s"
    )


async def test_the_same_event_published_three_times_is_handled_once_across_replicas(
    workers: Callable[[str], Awaitable[WorkerProcess]],
    rabbit_factory: Callable[[], Awaitable[RabbitMQTransport]],
    settings: Settings,
) -> None:
    # Two competing inventory replicas sharing one dedup store (SQLite file on this host).
    await workers("agents.inventory:agent")
    await workers("agents.inventory:agent")
    transport = await rabbit_factory()
    sink = f"{settings.naming.queue_prefix}sink"
    await transport.declare(Topology(settings.naming.exchange, (QueueSpec(sink, {}, ("inventory.*",)),)))
    envelopes = [
        new_envelope("order.placed", plan.event.model_dump(mode="json"), source="shop")
        for plan in plan_orders(50, seed=9, run_id="x3-")
    ]
    for _ in range(3):
        for envelope in envelopes:
            await transport.publish(to_message(envelope, settings.keyring, settings.naming.exchange))

    async def all_decided() -> bool:
        return await transport.queue_depth(sink) >= len(envelopes)

    await wait_for(all_decided, within=60, what="one decision per order")
    main = settings.naming.agent_queues("inventory").main

    async def drained() -> bool:
        return await transport.queue_depth(main) == 0

    await wait_for(drained, within=60, what="the inventory queue to drain")
    # Stop both replicas (graceful: in-flight work finishes), then count what they emitted.
    emitted: list[str] = []
    while (delivery := await transport.get(sink)) is not None:
        emitted.append(str(delivery.message_id))
        await delivery.ack()
    assert len(emitted) == len(envelopes) == len(set(emitted))
    print(f"\nchaos duplicates: events={len(envelopes)} published={3 * len(envelopes)} handled={len(emitted)}")
