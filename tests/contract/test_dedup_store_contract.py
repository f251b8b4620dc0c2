"""One contract for every dedup store: memory, SQLite, PostgreSQL and Redis.

PostgreSQL (127.0.0.1:5432, database ``test``, or ``CHOREO_TEST_PG_DSN``) and Redis
(127.0.0.1:6379, or ``CHOREO_TEST_REDIS_URL``) tests skip, saying why, where unreachable.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import urlparse

import pytest

from choreo.stores import DedupStore, MemoryDedupStore, SQLiteDedupStore
from choreo.testing import wait_for

PG_DSN = os.environ.get("CHOREO_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("CHOREO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def reachable(url: str, default_port: int) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or default_port), timeout=2):
            return True
    except OSError:
        return False


async def drop_pg_table(table: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
    finally:
        await conn.close()


async def drop_redis_prefix(prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


StoreFactory = Callable[[], DedupStore]


@pytest.fixture(params=["memory", "sqlite", "postgres", "redis"])
async def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """Makes stores sharing one backend, as replicas on several hosts would."""
    kind = str(request.param)
    name = f"t_{secrets.token_hex(4)}"
    made: list[DedupStore] = []
    shared_memory = MemoryDedupStore()

    def make() -> DedupStore:
        store: DedupStore
        if kind == "memory":
            store = shared_memory  # one process: every "replica" shares the dict
        elif kind == "sqlite":
            store = SQLiteDedupStore(tmp_path / "dedup.sqlite3")
        elif kind == "postgres":
            from choreo.stores.postgres import PostgresDedupStore

            store = PostgresDedupStore(PG_DSN, table=name)
        else:
            from choreo.stores.redis import RedisDedupStore

            store = RedisDedupStore(REDIS_URL, prefix=name, retention_s=60)
        made.append(store)
        return store

    if kind == "postgres" and not reachable(PG_DSN, 5432):
        pytest.skip(f"no PostgreSQL at {PG_DSN}")
    if kind == "redis" and not reachable(REDIS_URL, 6379):
        pytest.skip(f"no Redis at {REDIS_URL}")
    yield make
    for store in made:
        await store.close()
    if kind == "postgres":
        await drop_pg_table(name)
    elif kind == "redis":
        await drop_redis_prefix(name)


async def opened(factory: StoreFactory) -> DedupStore:
    store = factory()
    await store.open()
    return store


async def test_claim_then_complete_then_done(store_factory: StoreFactory) -> None:
    store = await opened(store_factory)
    assert await store.claim("a", "k1", lease_s=30) == "claimed"
    assert await store.claim("a", "k1", lease_s=30) == "busy"
    await store.complete("a", "k1")
    assert await store.claim("a", "k1", lease_s=30) == "done"
    # Keys are per agent: another agent handles the same event on its own.
    assert await store.claim("b", "k1", lease_s=30) == "claimed"


async def test_replicas_starting_together_on_a_fresh_backend_all_open(store_factory: StoreFactory) -> None:
    """Several workers' first start at once: each creates the schema if missing, none fails
    (PostgreSQL's CREATE TABLE IF NOT EXISTS alone is not safe against a concurrent one)."""
    stores = [store_factory() for _ in range(8)]
    await asyncio.gather(*(store.open() for store in stores))
    assert await stores[0].claim("a", "k", lease_s=30) == "claimed"
    assert await stores[-1].claim("a", "k", lease_s=30) == "busy"


async def test_release_lets_the_message_be_tried_again(store_factory: StoreFactory) -> None:
    store = await opened(store_factory)
    assert await store.claim("a", "k", lease_s=30) == "claimed"
    await store.release("a", "k")
    assert await store.claim("a", "k", lease_s=30) == "claimed"


async def test_replicas_share_claims_and_an_expired_lease_can_be_taken_over(store_factory: StoreFactory) -> None:
    first, second = await opened(store_factory), await opened(store_factory)
    assert await first.claim("a", "k", lease_s=0.3) == "claimed"
    assert await second.claim("a", "k", lease_s=30) == "busy"

    # The first replica "crashes" (never completes); once its lease runs out the second takes over.
    async def taken_over() -> bool:
        return await second.claim("a", "k", lease_s=30) == "claimed"

    await wait_for(taken_over, within=10, what="the expired lease to be taken over")
    await second.complete("a", "k")
    assert await first.claim("a", "k", lease_s=30) == "done"


async def test_an_extended_lease_is_not_taken_over(store_factory: StoreFactory) -> None:
    holder, other = await opened(store_factory), await opened(store_factory)
    loop = asyncio.get_running_loop()
    start = loop.time()
    claim = await holder.begin("a", "k", lease_s=0.6)
    assert claim.status == "claimed"
    # Renew every 0.3 s for three original leases; the other replica never gets the key. Each
    # lease outlives the next renewal by 0.3 s, so a loaded machine's stall does not end it.
    for tick in range(1, 7):
        await wait_for(lambda t=tick: loop.time() >= start + 0.3 * t, within=2, what="the next renewal")
        assert await other.claim("a", "k", lease_s=30) == "busy"
        await claim.extend(0.6)
    await claim.complete()
    assert await other.claim("a", "k", lease_s=30) == "done"


async def test_exactly_one_of_many_concurrent_claims_wins(store_factory: StoreFactory) -> None:
    stores = [await opened(store_factory) for _ in range(4)]
    results = await asyncio.gather(*(s.claim("a", "race", lease_s=30) for s in stores for _ in range(5)))
    assert results.count("claimed") == 1
    assert results.count("busy") == 19


async def test_begin_gives_a_claim_that_completes_or_releases(store_factory: StoreFactory) -> None:
    store = await opened(store_factory)
    claim = await store.begin("a", "k", lease_s=30)
    assert claim.status == "claimed"
    async with claim.attempt():
        pass
    await claim.release()
    await claim.release()  # idempotent
    claim = await store.begin("a", "k", lease_s=30)
    assert claim.status == "claimed"
    await claim.complete()
    assert (await store.begin("a", "k", lease_s=30)).status == "done"


async def test_cleanup_removes_done_keys_past_retention(
    store_factory: StoreFactory, request: pytest.FixtureRequest
) -> None:
    store = await opened(store_factory)
    await store.complete("a", "old")
    assert await store.claim("a", "pending", lease_s=30) == "claimed"
    removed = await store.cleanup(older_than_s=0)
    if "redis" in request.node.name:
        assert removed == 0  # Redis expires done marks by itself (PX retention)
        return
    assert removed == 1
    assert await store.claim("a", "old", lease_s=30) == "claimed"  # forgotten after retention
    assert await store.claim("a", "pending", lease_s=30) == "busy"  # claims are not cleaned up


@pytest.mark.parametrize(
    "key",
    ["a\u0000b", secrets.token_hex(5000), "\U0001f600" * 128, "sha256:" + "0" * 64],
    ids=["nul", "10k-chars", "4-byte-chars", "looks-hashed"],
)
async def test_any_key_the_wire_format_allows_can_be_claimed_and_completed(
    store_factory: StoreFactory, key: str
) -> None:
    """A dedup key is any JSON string: a NUL or 10 kB of it must work like any other key
    (PostgreSQL refused both, and each such message looped into retries_exhausted)."""
    store = store_factory()
    await store.open()
    assert await store.claim("agent", key, lease_s=30) == "claimed"
    assert await store.claim("agent", key, lease_s=30) == "busy"
    assert await store.claim("agent", key + "x", lease_s=30) == "claimed"
    await store.complete("agent", key)
    assert await store.claim("agent", key, lease_s=30) == "done"
    claim = await store.begin("agent", key, lease_s=30)
    assert claim.status == "done"
