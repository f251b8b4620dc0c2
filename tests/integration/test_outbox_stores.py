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
from choreo.outbox import (
    TABLE,
    OutboxError,
    PostgresOutbox,
    Relay,
    SQLiteOutbox,
    ensure_postgres,
    open_outbox,
    write_postgres,
    write_sqlite,
)
from choreo.testing import wait_for
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


def test_sqlite_urls_read_as_in_sqlalchemy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = open_outbox("sqlite:///shop.db")
    assert isinstance(relative, SQLiteOutbox)
    assert relative.path == "shop.db"  # in the working directory, not /shop.db
    absolute = open_outbox(f"sqlite:///{tmp_path / 'shop.db'}")  # four slashes in all
    assert isinstance(absolute, SQLiteOutbox)
    assert absolute.path == str(tmp_path / "shop.db")


async def test_sqlite_outbox_refuses_a_missing_file_a_non_database_and_a_missing_table(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    with pytest.raises(OutboxError, match="does not exist"):
        await SQLiteOutbox(str(missing)).open()
    assert not missing.exists()  # nothing created
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n" * 100)
    with pytest.raises(OutboxError, match="not a usable SQLite database"):
        await SQLiteOutbox(str(text)).open()
    other = tmp_path / "other.db"
    sqlite3.connect(other).close()
    with pytest.raises(OutboxError, match=f"no {TABLE} table"):
        await SQLiteOutbox(str(other)).open()


async def test_relay_sets_aside_a_row_it_cannot_publish_and_sends_the_rest(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "shop.db"
    db = sqlite3.connect(path, isolation_level=None)
    for n in range(4):
        write_sqlite(db, Shipped(n=n), source="shop")
        if n == 1:  # a row some other writer got wrong: no relay can ever send it
            db.execute(f"INSERT INTO {TABLE} (id, type, body) VALUES ('bad-1', 'parcel.shipped', x'7b7d')")
    db.close()
    transport = await sink(settings)
    box = SQLiteOutbox(str(path))
    await box.open()
    relay = Relay(box, transport, settings, batch=2)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop, idle_s=0.01))
    try:
        await wait_for(lambda: relay.published == 4 or task.done(), within=10, what="the 4 good rows")
        assert not task.done()  # the bad row did not kill the relay
    finally:
        stop.set()
        await task
    assert await relay_all(relay, transport, settings) == [0, 1, 2, 3]  # in order, around the bad one
    assert [(row.seq, row.id) for row in relay.failed.values()] == [(3, "bad-1")]
    assert "ValidationError" in relay.failed[3].error
    assert await box.pending() == 1  # left unsent, never lost
    await box.close()
