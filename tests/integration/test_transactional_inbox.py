"""PostgreSQL transactional inbox: a handler's writes and its dedup mark commit together."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections.abc import AsyncIterator, Sequence

import asyncpg
import pytest

from choreo import Agent, ConfigError, Context, Event, Publisher, Settings, Worker
from choreo.errors import PublishNotConfirmed
from choreo.retry import RetryPolicy
from choreo.stores.postgres import PostgresDedupStore, connection_of
from choreo.testing import wait_for
from choreo.transport import InMemoryBroker, InMemoryTransport, OutgoingMessage

from ..contract.test_dedup_store_contract import PG_DSN, reachable

pytestmark = pytest.mark.skipif(not reachable(PG_DSN, 5432), reason=f"no PostgreSQL at {PG_DSN}")


class Deposit(Event, type="account.deposited"):
    account: str
    cents: int


class Receipt(Event, type="account.receipt"):
    account: str


@pytest.fixture
async def db() -> AsyncIterator[tuple[asyncpg.Connection, str]]:
    suffix = secrets.token_hex(4)
    conn = await asyncpg.connect(PG_DSN)
    ledger = f"ledger_{suffix}"
    await conn.execute(f"CREATE TABLE {ledger} (account text, cents int)")
    yield conn, suffix
    await conn.execute(f"DROP TABLE IF EXISTS {ledger}")
    await conn.execute(f"DROP TABLE IF EXISTS dedup_{suffix}")
    await conn.close()


def ledger_agent(ledger: str, *, fail_first: int = 0) -> tuple[Agent[None], list[int]]:
    agent: Agent[None] = Agent("ledger", transactional=True, retry=RetryPolicy(attempts=3, backoff_s=0.01))
    tries: list[int] = []

    @agent.on(Deposit)
    async def deposit(event: Deposit, ctx: Context[None]) -> Receipt:
        conn = connection_of(ctx)
        await conn.execute(f"INSERT INTO {ledger} (account, cents) VALUES ($1, $2)", event.account, event.cents)
        tries.append(event.cents)
        if len(tries) <= fail_first:
            raise RuntimeError("fails after writing: the write must be undone")
        return Receipt(account=event.account)

    return agent, tries


class FailOnce(InMemoryTransport):
    def __init__(self, broker: InMemoryBroker) -> None:
        super().__init__(broker)
        self.failed = False

    async def publish_many(self, messages: Sequence[OutgoingMessage]) -> None:
        if not self.failed:
            self.failed = True
            raise PublishNotConfirmed("simulated")
        await super().publish_many(messages)


async def run(
    agent: Agent[None], settings: Settings, transport: InMemoryTransport, events: list[Deposit], suffix: str
) -> Worker:
    store = PostgresDedupStore(PG_DSN, table=f"dedup_{suffix}", transactional=True)
    worker = Worker([agent], settings=settings, transport=transport)
    worker.runtimes[0].dedup = store
    await worker.start()
    async with Publisher(transport=transport, settings=settings, source="t") as publisher:
        for event in events:
            envelope = await publisher.publish(event)
            await publisher.publish_envelope(envelope)  # and a duplicate of each
    return worker


async def test_writes_commit_once_with_the_mark_and_failed_tries_roll_back(
    db: tuple[asyncpg.Connection, str], settings: Settings
) -> None:
    conn, suffix = db
    agent, tries = ledger_agent(f"ledger_{suffix}", fail_first=2)
    transport = InMemoryBroker().transport()
    await transport.connect()
    worker = await run(agent, settings, transport, [Deposit(account="acc", cents=100)], suffix)
    try:
        await wait_for(lambda: worker.runtimes[0].stats.handled == 1, within=10, what="the deposit")
        await wait_for(lambda: worker.runtimes[0].stats.duplicates == 1, within=10, what="the duplicate")
    finally:
        await worker.stop()
    assert tries == [100, 100, 100]  # two failed tries wrote and were rolled back
    assert await conn.fetch(f"SELECT account, cents FROM ledger_{suffix}") == [("acc", 100)]
    assert await conn.fetchval(f"SELECT count(*) FROM dedup_{suffix} WHERE done") == 1


async def test_unconfirmed_emits_roll_back_the_handlers_writes(
    db: tuple[asyncpg.Connection, str], settings: Settings
) -> None:
    conn, suffix = db
    agent, tries = ledger_agent(f"ledger_{suffix}")
    broker = InMemoryBroker()
    transport = FailOnce(broker)
    await transport.connect()
    worker = await run(agent, settings, transport, [Deposit(account="acc", cents=7)], suffix)
    try:
        await wait_for(lambda: worker.runtimes[0].stats.handled == 1, within=10, what="the re-run")
    finally:
        await worker.stop()
    assert tries == [7, 7]  # ran, emit not confirmed, rolled back, ran again
    assert await conn.fetchval(f"SELECT sum(cents) FROM ledger_{suffix}") == 7


async def test_a_crashed_holder_releases_the_key_with_its_connection(db: tuple[asyncpg.Connection, str]) -> None:
    conn, suffix = db
    first = PostgresDedupStore(PG_DSN, table=f"dedup_{suffix}", transactional=True)
    second = PostgresDedupStore(PG_DSN, table=f"dedup_{suffix}", transactional=True, lock_timeout_s=10)
    await first.open()
    await second.open()
    try:
        held = await first.begin("a", "k", lease_s=30)
        assert held.status == "claimed"
        waiting = asyncio.create_task(second.begin("a", "k", lease_s=30))

        async def blocked_on_lock() -> bool:
            query = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%dedup_%'"
            return bool(await conn.fetchval(query))

        await wait_for(blocked_on_lock, within=10, what="the second replica to wait on the row lock")
        assert not waiting.done()
        # The holder's process dies: its backend goes away, the transaction rolls back.
        holder = held.transaction
        assert holder is not None
        pid = await holder.fetchval("SELECT pg_backend_pid()")  # type: ignore[attr-defined]
        await conn.execute("SELECT pg_terminate_backend($1)", pid)
        taken = await asyncio.wait_for(waiting, 10)
        assert taken.status == "claimed"
        await taken.complete()
        assert (await second.begin("a", "k", lease_s=30)).status == "done"
    finally:
        await first.close()
        await second.close()


async def test_agent_requiring_a_transaction_refuses_other_stores(settings: Settings) -> None:
    agent, _ = ledger_agent("unused")
    transport = InMemoryBroker().transport()
    await transport.connect()
    worker = Worker([agent], settings=dataclasses.replace(settings, dedup_url="memory:"), transport=transport)
    with pytest.raises(ConfigError, match="transactional"):
        await worker.start()
