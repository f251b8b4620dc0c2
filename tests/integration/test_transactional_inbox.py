"""PostgreSQL transactional inbox: a handler's writes and its dedup mark commit together."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import asyncpg
import pytest

from choreo import Agent, ConfigError, Context, Event, Publisher, Settings, Worker
from choreo.agent import Failure
from choreo.errors import PublishNotConfirmed
from choreo.retry import RetryPolicy
from choreo.stores.postgres import PostgresDedupStore, connection_of
from choreo.testing import wait_for
from choreo.transport import InMemoryBroker, InMemoryTransport, OutgoingMessage, Transport

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


@pytest.mark.rabbitmq
def slow_worker(agent: Agent[None], settings: Settings, transport: Transport, suffix: str) -> Worker:
    """A worker for ``agent`` on the transactional store, with a 0.5 s shutdown grace period."""
    worker = Worker([agent], settings=dataclasses.replace(settings, shutdown_grace_s=0.5), transport=transport)
    worker.runtimes[0].dedup = PostgresDedupStore(PG_DSN, table=f"dedup_{suffix}", transactional=True)
    return worker


async def deposit_and_wait(worker: Worker, settings: Settings, transport: Transport, started: asyncio.Event) -> None:
    """Start ``worker``, publish one deposit and return once its handler has ``started``."""
    await worker.start()
    async with Publisher(transport=transport, settings=settings, source="t") as publisher:
        await publisher.publish(Deposit(account="acc", cents=5))
    await asyncio.wait_for(started.wait(), 10)


async def test_stop_ends_transactions_still_held_after_the_grace_period(
    db: tuple[asyncpg.Connection, str], settings: Settings, rabbit_factory: Callable[[], Awaitable[Transport]]
) -> None:
    """A handler outliving the grace period must not hold stop() up: its transaction is ended
    (rolled back: nothing done, its writes gone) and its message, never acked, comes back."""
    conn, suffix = db
    ledger = f"ledger_{suffix}"
    agent: Agent[None] = Agent("slow-ledger", transactional=True, retry=RetryPolicy(attempts=1))
    started = asyncio.Event()
    finish = asyncio.Event()  # lets the handler end early once the test has seen what it needs

    @agent.on(Deposit)
    async def deposit(event: Deposit, ctx: Context[None]) -> Receipt:
        await connection_of(ctx).execute(f"INSERT INTO {ledger} (account, cents) VALUES ($1, $2)", "acc", event.cents)
        started.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(finish.wait(), 10)  # a 10 s handler
        return Receipt(account=event.account)

    transport = await rabbit_factory()
    worker = slow_worker(agent, settings, transport, suffix)
    runtime = worker.runtimes[0]
    try:
        await deposit_and_wait(worker, settings, transport, started)
        began = time.monotonic()
        finished = await asyncio.wait_for(worker.stop(), 30)
        elapsed = time.monotonic() - began
        await transport.close()  # as a worker process would on its way out
    finally:
        finish.set()
    assert not finished  # the handler was still running at the deadline
    assert elapsed < 5, f"stop() took {elapsed:.1f}s with a 0.5 s grace period"
    await wait_for(lambda: runtime.in_flight == 0, within=10, what="the abandoned handler to end")
    assert await conn.fetchval(f"SELECT count(*) FROM dedup_{suffix} WHERE done") == 0
    assert await conn.fetchval(f"SELECT count(*) FROM {ledger}") == 0  # its write was rolled back
    admin = await rabbit_factory()
    await wait_for(
        lambda: admin.queue_depth(runtime.queues.main), within=10, what="the unacked message back in its queue"
    )
    assert await admin.queue_depth(runtime.queues.main) == 1


class DepositFailed(Event, type="account.deposit_failed"):
    account: str


@pytest.mark.parametrize("policy", ["last-try-with-compensation", "default"])
async def test_a_handler_abandoned_at_stop_settles_nothing(
    db: tuple[asyncpg.Connection, str],
    settings: Settings,
    rabbit_factory: Callable[[], Awaitable[Transport]],
    policy: str,
) -> None:
    """Once the grace period is over, a handler still running is cancelled before the store
    closes: it neither fails into a retry, a dead-letter or a compensation (as it did when the
    closed store made its next query fail), nor emits. Its message, never settled, is back in
    its queue when stop() returns, even on a connection the application keeps open."""
    conn, suffix = db
    ledger = f"ledger_{suffix}"
    retry = RetryPolicy(attempts=1, delayed=0) if policy != "default" else RetryPolicy()
    agent: Agent[None] = Agent("slow-ledger", transactional=True, retry=retry)
    started, go = asyncio.Event(), asyncio.Event()

    def failed(event: Deposit, failure: Failure) -> DepositFailed:
        return DepositFailed(account=event.account)

    async def deposit(event: Deposit, ctx: Context[None]) -> Receipt:
        db_conn = connection_of(ctx)
        await db_conn.execute(f"INSERT INTO {ledger} (account, cents) VALUES ($1, $2)", "acc", event.cents)
        started.set()
        await go.wait()  # still working when the grace period ends
        await db_conn.execute(f"INSERT INTO {ledger} (account, cents) VALUES ($1, $2)", "acc", -event.cents)
        return Receipt(account=event.account)

    agent.on(Deposit, on_failure=failed if policy != "default" else None)(deposit)
    listener: Agent[None] = Agent("listener")
    heard: list[str] = []

    @listener.on(DepositFailed, Receipt)
    async def hear(event: Event, ctx: Context[None]) -> None:
        heard.append(event.event_type())

    listening = Worker([listener], settings=settings, transport=await rabbit_factory())
    await listening.start()
    transport = await rabbit_factory()  # the application's: the worker does not close it
    worker = slow_worker(agent, settings, transport, suffix)
    runtime = worker.runtimes[0]
    try:
        await deposit_and_wait(worker, settings, transport, started)
        assert not await asyncio.wait_for(worker.stop(), 30)
    finally:
        go.set()  # had it not been cancelled, the handler would go on against a closed store
    await wait_for(lambda: runtime.in_flight == 0, within=10, what="the abandoned handler to end")
    # Anything emitted would reach the listener well within this; what it would have heard
    # (the failure event, say) is what the old code published.
    with contextlib.suppress(TimeoutError):
        await wait_for(lambda: bool(heard), within=1.0, what="an emitted event")
    await listening.stop()
    assert heard == []
    stats = runtime.stats
    assert (stats.emitted, stats.compensated, stats.retried_delayed, stats.dead_lettered_total) == (0, 0, 0, 0)
    assert await conn.fetchval(f"SELECT count(*) FROM dedup_{suffix} WHERE done") == 0
    assert await conn.fetchval(f"SELECT count(*) FROM {ledger}") == 0
    admin = await rabbit_factory()
    assert await admin.queue_depth(runtime.queues.dlq) == 0
    for queue in runtime.topology.queues:
        if ".retry" in queue.name:
            assert await admin.queue_depth(queue.name) == 0, queue.name
    # Back in its queue already, though the application keeps its connection open.
    await wait_for(
        lambda: admin.queue_depth(runtime.queues.main), within=10, what="the unacked message back in its queue"
    )
    assert await admin.queue_depth(runtime.queues.main) == 1
    await transport.close()


async def test_close_ends_open_transactions_and_does_not_wait_for_busy_connections(
    db: tuple[asyncpg.Connection, str],
) -> None:
    conn, suffix = db
    store = PostgresDedupStore(PG_DSN, table=f"dedup_{suffix}", transactional=True, close_timeout_s=0.2)
    await store.open()
    finishing = await store.begin("a", "k1", lease_s=30)
    dropping = await store.begin("a", "k2", lease_s=30)
    busy = await store.pool.acquire()  # a connection in use outside any claim
    began = time.monotonic()
    await asyncio.wait_for(store.close(), 10)
    assert time.monotonic() - began < 5  # it used to wait for all three for ever
    with pytest.raises(asyncpg.InterfaceError, match="closed"):
        await finishing.complete()  # too late: rolled back, never marked done
    await dropping.release()  # already rolled back: nothing left to do
    with pytest.raises(asyncpg.InterfaceError):
        await busy.fetchval("SELECT 1")  # terminated with the pool
    assert await conn.fetchval(f"SELECT count(*) FROM dedup_{suffix} WHERE done") == 0
    # The row locks went with the transactions: another replica claims both keys at once.
    other = PostgresDedupStore(PG_DSN, table=f"dedup_{suffix}", transactional=True, lock_timeout_s=1)
    await other.open()
    try:
        for key in ("k1", "k2"):
            claim = await other.begin("a", key, lease_s=30)
            assert claim.status == "claimed"
            await claim.release()
    finally:
        await other.close()
