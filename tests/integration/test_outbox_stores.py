"""Outbox on SQLite and PostgreSQL: only committed events are relayed, in order, signed."""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from choreo import Event, Settings
from choreo.codec import loads_object
from choreo.outbox import TABLE, PostgresOutbox, Relay, SQLiteOutbox, ensure_postgres, write_postgres, write_sqlite
from choreo.topology import QueueSpec, Topology
from choreo.transport import InMemoryBroker, InMemoryTransport

from ..contract.test_dedup_store_contract import PG_DSN, reachable


class Shipped(Event, type="parcel.shipped"):
    n: int


async def relay_all(relay: Relay, transport: InMemoryTransport, settings: Settings) -> list[int]:
    while await relay.relay_once():
        pass
    got = []
    while (delivery := await transport.get(f"{settings.naming.queue_prefix}sink")) is not None:
        settings.keyring.verify(delivery.body, delivery.headers)
        got.append(loads_object(delivery.body)["payload"]["n"])
        await delivery.ack()
    return got


async def sink(settings: Settings) -> InMemoryTransport:
    transport = InMemoryBroker().transport()
    await transport.connect()
    queue = QueueSpec(f"{settings.naming.queue_prefix}sink", {}, ("parcel.*",))
    await transport.declare(Topology(settings.naming.exchange, (queue,)))
    return transport


async def test_sqlite_outbox_relays_committed_events_in_order(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "shop.db"
    db = sqlite3.connect(path, isolation_level=None)
    for n in range(5):
        db.execute("BEGIN")
        write_sqlite(db, Shipped(n=n), source="shop")
        db.execute("ROLLBACK" if n == 2 else "COMMIT")  # n=2 never happened
    db.close()
    transport = await sink(settings)
    box = SQLiteOutbox(str(path))
    await box.open()
    relay = Relay(box, transport, settings, batch=2)
    assert await relay_all(relay, transport, settings) == [0, 1, 3, 4]
    assert await box.pending() == 0
    assert await relay_all(relay, transport, settings) == []  # sent rows are not sent again
    await box.close()


@pytest.fixture
async def schema_dsn() -> AsyncIterator[str]:
    """A DSN whose search path is a fresh schema of its own, dropped after the test."""
    if not reachable(PG_DSN, 5432):
        pytest.skip(f"no PostgreSQL at {PG_DSN}")
    schema = f"outbox_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(PG_DSN)
    await conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{PG_DSN}?options=-csearch_path%3D{schema}"
    finally:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await conn.close()


async def test_postgres_outbox_relays_committed_events_in_order(settings: Settings, schema_dsn: str) -> None:
    dsn_conn = schema_dsn
    service = await asyncpg.connect(dsn_conn)
    try:
        await ensure_postgres(service)
        for n in range(5):
            tx = service.transaction()
            await tx.start()
            await write_postgres(service, Shipped(n=n), source="shop")
            await (tx.rollback() if n == 2 else tx.commit())
        transport = await sink(settings)
        box = PostgresOutbox(dsn_conn)
        await box.open()
        relay = Relay(box, transport, settings, batch=2)
        assert await relay_all(relay, transport, settings) == [0, 1, 3, 4]
        assert await box.pending() == 0
        assert await service.fetchval(f"SELECT count(*) FROM {TABLE} WHERE sent_at IS NOT NULL") == 4
        await box.close()
    finally:
        await service.close()


async def test_services_creating_the_postgres_outbox_at_once_all_succeed(schema_dsn: str) -> None:
    services = [await asyncpg.connect(schema_dsn) for _ in range(8)]
    try:
        await asyncio.gather(*(ensure_postgres(service) for service in services))
        tx = services[0].transaction()
        await tx.start()
        await write_postgres(services[0], Shipped(n=1), source="shop")
        await tx.commit()
        assert await services[-1].fetchval(f"SELECT count(*) FROM {TABLE}") == 1
    finally:
        for service in services:
            await service.close()


async def test_ensure_postgres_inside_the_callers_own_transaction(schema_dsn: str) -> None:
    service = await asyncpg.connect(schema_dsn)
    try:
        await service.execute("BEGIN")  # a transaction asyncpg did not start
        await ensure_postgres(service)
        await write_postgres(service, Shipped(n=1), source="shop")
        await service.execute("COMMIT")
        assert await service.fetchval(f"SELECT count(*) FROM {TABLE}") == 1
    finally:
        await service.close()
