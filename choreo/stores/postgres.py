"""PostgreSQL dedup store (asyncpg), shared by replicas of an agent on several hosts.

Leases use the database clock, so hosts with skewed clocks still agree. With
``transactional=True`` each message's claim is a transaction: the dedup row is locked
(``SELECT ... FOR UPDATE``) instead of leased, the handler writes through
``connection_of(ctx)`` in the same transaction, and the commit makes its writes and the dedup
mark durable together, after the emitted events were confirmed. A crashed worker's
connection drops, the transaction rolls back and the lock is gone: another replica takes over.
The only module that imports asyncpg.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from ..agent import Context
from ..errors import ConfigError
from .base import Claim, ClaimResult, LeaseStoreMixin, ensure_pg_schema

__all__ = ["PostgresDedupStore", "connection_of"]

_IDENT = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def connection_of(ctx: Context[Any]) -> asyncpg.Connection:
    """The transaction a transactional PostgreSQL store opened for this message."""
    conn = ctx.transaction
    if not isinstance(conn, asyncpg.Connection | asyncpg.pool.PoolConnectionProxy):
        raise ConfigError("no database transaction: use PostgresDedupStore(..., transactional=True)")
    return conn  # type: ignore[return-value]


# What PostgreSQL and asyncpg can raise: the CLI reports these in one line, as failures of the
# world outside.
BACKEND_ERRORS: tuple[type[Exception], ...] = (asyncpg.PostgresError, asyncpg.InterfaceError)

# PostgreSQL text cannot hold NUL, and a btree index entry is at most about 8 kB: such keys
# (valid JSON strings all the same) are stored as their SHA-256, every other key as it is, so
# the keys of existing tables keep their meaning.
_MAX_KEY_BYTES = 1024


def stored_key(key: str) -> str:
    """The column value for dedup key ``key``; idempotent (a stored key maps to itself)."""
    if "\x00" not in key and (len(key) <= _MAX_KEY_BYTES // 4 or len(key.encode()) <= _MAX_KEY_BYTES):
        return key
    return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


class PostgresDedupStore(LeaseStoreMixin):
    def __init__(
        self,
        dsn: str,
        *,
        table: str = "choreo_dedup",
        transactional: bool = False,
        min_size: int = 1,
        max_size: int = 16,
        lock_timeout_s: float = 30.0,
    ) -> None:
        if _IDENT.fullmatch(table) is None:
            raise ConfigError(f"table name {table!r} must be a plain lowercase SQL identifier")
        self.dsn = dsn
        self.table = table
        self.transactional = transactional
        self._sizes = (min_size, max_size)
        self.lock_timeout_s = lock_timeout_s
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("PostgresDedupStore is not open")
        return self._pool

    async def open(self) -> None:
        if self._pool is not None:
            return
        self._pool = await asyncpg.create_pool(self.dsn, min_size=self._sizes[0], max_size=self._sizes[1])
        async with self._pool.acquire() as conn:
            await ensure_pg_schema(
                conn,
                self.table,
                f"""
                CREATE TABLE IF NOT EXISTS {self.table} (
                    agent text NOT NULL,
                    key text NOT NULL,
                    done boolean NOT NULL DEFAULT false,
                    lease_until timestamptz NOT NULL,
                    updated_at timestamptz NOT NULL DEFAULT now(),
                    PRIMARY KEY (agent, key)
                );
                CREATE INDEX IF NOT EXISTS {self.table}_done_at ON {self.table} (updated_at) WHERE done;
                """,
            )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def claim(self, agent: str, key: str, *, lease_s: float) -> ClaimResult:
        key = stored_key(key)
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                f"""
                INSERT INTO {self.table} (agent, key, done, lease_until, updated_at)
                VALUES ($1, $2, false, now() + make_interval(secs => $3), now())
                ON CONFLICT (agent, key) DO UPDATE
                    SET lease_until = EXCLUDED.lease_until, updated_at = now()
                    WHERE {self.table}.done = false AND {self.table}.lease_until <= now()
                RETURNING done
                """,
                agent,
                key,
                lease_s,
            )
            if row is not None:
                return "claimed"
            done = await conn.fetchval(f"SELECT done FROM {self.table} WHERE agent = $1 AND key = $2", agent, key)
        if done is None:  # released in between
            return await self.claim(agent, key, lease_s=lease_s)
        return "done" if done else "busy"

    async def complete(self, agent: str, key: str) -> None:
        key = stored_key(key)
        await self.pool.execute(
            f"""
            INSERT INTO {self.table} (agent, key, done, lease_until, updated_at) VALUES ($1, $2, true, now(), now())
            ON CONFLICT (agent, key) DO UPDATE SET done = true, updated_at = now()
            """,
            agent,
            key,
        )

    async def release(self, agent: str, key: str) -> None:
        key = stored_key(key)
        await self.pool.execute(f"DELETE FROM {self.table} WHERE agent = $1 AND key = $2 AND NOT done", agent, key)

    async def extend(self, agent: str, key: str, *, lease_s: float) -> None:
        key = stored_key(key)
        await self.pool.execute(
            f"UPDATE {self.table} SET lease_until = now() + make_interval(secs => $3), updated_at = now() "
            "WHERE agent = $1 AND key = $2 AND NOT done",
            agent,
            key,
            lease_s,
        )

    async def cleanup(self, *, older_than_s: float) -> int:
        result = await self.pool.execute(
            f"DELETE FROM {self.table} WHERE done AND updated_at < now() - make_interval(secs => $1)", older_than_s
        )
        return int(result.split()[-1])

    async def begin(self, agent: str, key: str, *, lease_s: float) -> Claim:
        key = stored_key(key)
        if not self.transactional:
            return await super().begin(agent, key, lease_s=lease_s)
        conn = await self.pool.acquire()
        tx = conn.transaction()
        try:
            await tx.start()
            await conn.execute(f"SET LOCAL lock_timeout = {int(self.lock_timeout_s * 1000)}")
            # Blocks while another replica's transaction holds the row; then sees its outcome.
            await conn.execute(
                f"""
                INSERT INTO {self.table} (agent, key, done, lease_until, updated_at)
                VALUES ($1, $2, false, now(), now()) ON CONFLICT (agent, key) DO NOTHING
                """,
                agent,
                key,
            )
            done = await conn.fetchval(
                f"SELECT done FROM {self.table} WHERE agent = $1 AND key = $2 FOR UPDATE", agent, key
            )
        except asyncpg.LockNotAvailableError:
            await tx.rollback()
            await self.pool.release(conn)
            return _TxClaim.finished(self, "busy")
        except BaseException:
            await tx.rollback()
            await self.pool.release(conn)
            raise
        claim = _TxClaim(self, conn, tx=tx, agent=agent, key=key, status="done" if done else "claimed")
        if done:
            await claim.release()
        return claim


class _TxClaim:
    """A claim that is an open transaction holding the dedup row's lock."""

    def __init__(
        self,
        store: PostgresDedupStore,
        conn: Any,
        *,
        tx: Any,
        agent: str,
        key: str,
        status: ClaimResult,
    ) -> None:
        self._store = store
        self._conn = conn
        self._tx = tx
        self._agent = agent
        self._key = key
        self._status: ClaimResult = status

    @classmethod
    def finished(cls, store: PostgresDedupStore, status: ClaimResult) -> _TxClaim:
        return cls(store, None, tx=None, agent="", key="", status=status)

    @property
    def status(self) -> ClaimResult:
        return self._status

    @property
    def transaction(self) -> object | None:
        conn: object | None = self._conn
        return conn

    @contextlib.asynccontextmanager
    async def attempt(self) -> AsyncIterator[None]:
        if self._conn is None:
            yield
            return
        async with self._conn.transaction():  # a savepoint inside the open transaction
            yield

    async def complete(self) -> None:
        if self._conn is None:
            return
        await self._conn.execute(
            f"UPDATE {self._store.table} SET done = true, updated_at = now() WHERE agent = $1 AND key = $2",
            self._agent,
            self._key,
        )
        try:
            await self._tx.commit()
        finally:
            await self._finish()

    async def extend(self, lease_s: float) -> None:
        return None  # the row lock lasts as long as the transaction: nothing to renew

    async def release(self) -> None:
        if self._conn is None:
            return
        try:
            await self._tx.rollback()
        finally:
            await self._finish()

    async def _finish(self) -> None:
        conn, self._conn = self._conn, None
        await self._store.pool.release(conn)
