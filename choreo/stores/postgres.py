"""PostgreSQL dedup store (asyncpg), shared by replicas of an agent on several hosts.

Leases use the database clock, so hosts with skewed clocks still agree. With
``transactional=True`` each message's claim is a transaction: the dedup row is locked
(``SELECT ... FOR UPDATE``) instead of leased, the handler writes through
``connection_of(ctx)`` in the same transaction, and the commit makes its writes and the dedup
mark durable together, after the emitted events were confirmed. A crashed worker's
connection drops, the transaction rolls back and the lock is gone: another replica takes over.
:meth:`PostgresDedupStore.close` does the same to transactions still open when it is called
(the runtime closes the store once its shutdown grace period is over): it drops their
connections at once, so nothing is marked done and their unacked messages come back.
The only module that imports asyncpg.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg

from ..agent import Context
from ..errors import ConfigError
from ..log import get_logger
from .base import Claim, ClaimResult, LeaseStoreMixin, ensure_pg_schema

__all__ = ["PostgresDedupStore", "connection_of"]

log = get_logger("choreo.stores.postgres")

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
        close_timeout_s: float = 1.0,
    ) -> None:
        if _IDENT.fullmatch(table) is None:
            raise ConfigError(f"table name {table!r} must be a plain lowercase SQL identifier")
        self.dsn = dsn
        self.table = table
        self.transactional = transactional
        self._sizes = (min_size, max_size)
        self.lock_timeout_s = lock_timeout_s
        # How long close() lets the short queries of lease claims finish before it terminates
        # their connections (asyncpg's Pool.close() would wait for every acquired connection).
        self.close_timeout_s = close_timeout_s
        self._pool: asyncpg.Pool | None = None
        # Connections acquired for transactional claims and not yet given back: close() ends them.
        self._tx_conns: set[Any] = set()

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
        """Close the pool without waiting for handlers that outlived the shutdown grace period.

        Transactions still open belong to such handlers (or to deliveries still waiting for a
        row lock): their connections are terminated at once, so PostgreSQL rolls them back,
        nothing is marked done and the messages, unacked, are redelivered. Other connections
        get ``close_timeout_s`` to finish their query, then are terminated too.
        """
        pool, self._pool = self._pool, None
        if pool is None:
            return
        held, self._tx_conns = self._tx_conns, set()
        if held:
            log.warning("closing with transactions still open: rolling them back", table=self.table, count=len(held))
        for conn in held:
            # Returns it to the pool, closed; its proxy refuses further use. (A connection that
            # dropped by itself is back in the pool already, and its proxy says so.)
            with contextlib.suppress(asyncpg.InterfaceError):
                conn.terminate()
        # Pool.close() waits for every acquired connection; cancelled by the timeout, it
        # terminates the pool (asyncpg's documented behaviour), connections still in use included.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pool.close(), self.close_timeout_s)

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
        pool = self.pool
        conn = await pool.acquire()
        self._tx_conns.add(conn)
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
            await self._end(pool, conn, tx.rollback)
            return _TxClaim.finished(self, pool, "busy")
        except BaseException:
            await self._end(pool, conn, tx.rollback)
            raise
        claim = _TxClaim(self, pool, conn, tx=tx, agent=agent, key=key, status="done" if done else "claimed")
        if done:
            await claim.release()
        return claim

    def _owns(self, conn: Any) -> bool:
        """Whether ``conn`` is still a live transactional connection (not ended by close())."""
        return conn in self._tx_conns

    async def _end(self, pool: asyncpg.Pool, conn: Any, finish: Callable[[], Awaitable[None]]) -> None:
        """Commit or roll back (``finish``) and give ``conn`` back to ``pool``; a connection
        close() terminated meanwhile is already rolled back and back in the pool."""
        if not self._owns(conn):
            return
        try:
            await finish()
        finally:
            self._tx_conns.discard(conn)
            await pool.release(conn)


class _TxClaim:
    """A claim that is an open transaction holding the dedup row's lock."""

    def __init__(
        self,
        store: PostgresDedupStore,
        pool: asyncpg.Pool,
        conn: Any,
        *,
        tx: Any,
        agent: str,
        key: str,
        status: ClaimResult,
    ) -> None:
        self._store = store
        self._pool = pool
        self._conn = conn
        self._tx = tx
        self._agent = agent
        self._key = key
        self._status: ClaimResult = status

    @classmethod
    def finished(cls, store: PostgresDedupStore, pool: asyncpg.Pool, status: ClaimResult) -> _TxClaim:
        return cls(store, pool, None, tx=None, agent="", key="", status=status)

    @property
    def status(self) -> ClaimResult:
        return self._status

    @property
    def transaction(self) -> object | None:
        conn: object | None = self._conn
        return conn

    def _live(self, conn: Any) -> Any:
        if not self._store._owns(conn):
            raise asyncpg.InterfaceError(
                "the dedup store was closed while this message was handled: its transaction was rolled back"
            )
        return conn

    @contextlib.asynccontextmanager
    async def attempt(self) -> AsyncIterator[None]:
        if self._conn is None:
            yield
            return
        async with self._live(self._conn).transaction():  # a savepoint inside the open transaction
            yield

    async def complete(self) -> None:
        conn = self._conn
        if conn is None:
            return
        await self._live(conn).execute(
            f"UPDATE {self._store.table} SET done = true, updated_at = now() WHERE agent = $1 AND key = $2",
            self._agent,
            self._key,
        )
        self._conn = None
        # close() may have ended the transaction while the update was answered: then there
        # is nothing to commit, and the caller must not ack.
        await self._store._end(self._pool, self._live(conn), self._tx.commit)

    async def extend(self, lease_s: float) -> None:
        return None  # the row lock lasts as long as the transaction: nothing to renew

    async def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._store._end(self._pool, conn, self._tx.rollback)
