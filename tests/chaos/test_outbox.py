"""The outbox relay killed with -9 and the broker dropping connections in the middle of relaying:
every event is published, and consumers handle each id once."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from choreo import Agent, Context, Event, Settings, Worker
from choreo.outbox import write_sqlite
from choreo.testing import wait_for
from choreo.transport.rabbitmq import RabbitMQTransport

from ..conftest import SECRET
from .conftest import close_all_connections, need_rabbitmqctl

pytestmark = pytest.mark.rabbitmq
TOTAL = 4800


class InvoiceIssued(Event, type="invoice.issued"):
    invoice: int


def write_events(path: Path, start: int, count: int) -> list[str]:
    """The service: each invoice row and its event commit in one transaction."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE IF NOT EXISTS invoices (n INTEGER PRIMARY KEY)")
    ids = []
    for n in range(start, start + count):
        db.execute("BEGIN")
        db.execute("INSERT INTO invoices (n) VALUES (?)", (n,))
        ids.append(write_sqlite(db, InvoiceIssued(invoice=n), source="billing").id)
        db.execute("COMMIT")
    db.close()
    return ids


def sent(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("SELECT count(*) FROM choreo_outbox WHERE sent_at IS NOT NULL").fetchone()[0])
    finally:
        db.close()


async def test_relay_killed_and_connections_dropped_loses_and_duplicates_nothing(
    rabbit_factory: Callable[[], Awaitable[RabbitMQTransport]], settings: Settings, amqp_url: str, tmp_path: Path
) -> None:
    need_rabbitmqctl()
    db_path = tmp_path / "billing.db"
    handled: list[str] = []
    agent: Agent[None] = Agent("accounting")

    @agent.on(InvoiceIssued)
    async def book(event: InvoiceIssued, ctx: Context[None]) -> None:
        handled.append(ctx.event_id)

    worker = Worker([agent], settings=settings, transport=await rabbit_factory())
    await worker.start()
    env = {
        **os.environ,
        "CHOREO_AMQP_URL": amqp_url,
        "CHOREO_SIGNING_KEYS": f"k1={SECRET}",
        "CHOREO_EXCHANGE": settings.naming.exchange,
        "CHOREO_QUEUE_PREFIX": settings.naming.queue_prefix,
    }
    log = (tmp_path / "relay.log").open("ab")

    async def start_relay() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "choreo", "outbox", "relay", "--db", f"sqlite:///{db_path}", "--batch", "5",
            env=env, stdout=log, stderr=log,
        )  # fmt: skip

    written = write_events(db_path, 0, 600)
    relay = await start_relay()
    try:
        await wait_for(lambda: sent(db_path) >= 150, within=60, what="the relay to get going")
        relay.send_signal(signal.SIGKILL)
        await relay.wait()
        at_kill = sent(db_path)
        assert at_kill < 600, "relayed everything before the kill; it proves nothing"
        written += write_events(db_path, 600, TOTAL - 600)  # the service keeps writing while no relay runs
        relay = await start_relay()
        await wait_for(lambda: sent(db_path) >= at_kill + 50, within=60, what="the restarted relay")
        await close_all_connections("outbox chaos")
        at_close = sent(db_path)
        assert at_close < TOTAL, "relayed everything before the connections closed; it proves nothing"
        await wait_for(lambda: sent(db_path) == TOTAL, within=120, what="every row to be relayed")
        await wait_for(lambda: len(set(handled)) == TOTAL, within=120, what="every event to be handled")
        await wait_for(worker.is_ready, within=60, what="the consumer to be back after the close")
    finally:
        if relay.returncode is None:
            relay.send_signal(signal.SIGTERM)
            await asyncio.wait_for(relay.wait(), 30)
        log.close()
        await worker.stop()
    runtime = worker.runtimes[0]
    assert sorted(handled) == sorted(written)  # every event, each handled once
    print(
        f"\noutbox chaos: written={TOTAL} relay_kills=1 sent_at_kill={at_kill} sent_at_close={at_close} "
        f"handled={len(handled)} unique={len(set(handled))} duplicates_absorbed={runtime.stats.duplicates}"
    )
