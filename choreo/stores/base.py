"""The dedup store interface: claim-then-commit with a lease, keyed by (agent, dedup_key).

Contract:
- :meth:`DedupStore.claim` returns ``"claimed"`` to exactly one caller at a time; others get
  ``"busy"`` while the lease runs, or ``"done"`` once the key is completed. An expired lease
  (its holder crashed) can be claimed again, so another replica can take the message.
- :meth:`DedupStore.complete` marks the key done; the runtime calls it only after the handler
  succeeded and its emitted events were confirmed, so "done" means "its effects exist".
- :meth:`DedupStore.release` drops a claim after a failure so the message can be tried again.
- :meth:`DedupStore.extend` renews a claim's lease while its handler still runs, so leases
  can be short (a crashed holder's claim expires soon) whatever the handler's duration.
- Done keys are kept for the retention window, then :meth:`DedupStore.cleanup` removes them.

The runtime works through :meth:`DedupStore.begin`, which returns a :class:`Claim` for one
message. Transactional stores (PostgreSQL with ``transactional=True``) return a claim that is
an open database transaction: the handler writes through ``claim.transaction`` and its writes
commit together with the dedup mark (a transactional inbox).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable
from typing import Any, Literal, Protocol

__all__ = ["Claim", "ClaimResult", "DedupStore", "LeaseClaim", "ensure_pg_schema"]

# Workers starting together race on PostgreSQL's CREATE ... IF NOT EXISTS (the loser can fail
# with a unique violation in the catalog), so choreo's table set-up runs under a
# transaction-level advisory lock of this class, keyed by hashtext(schema.table).
_PG_SCHEMA_LOCK = 0x63686F72  # "chor"


async def ensure_pg_schema(conn: Any, table: str, ddl: str) -> None:
    """Run ``ddl`` (``CREATE ... IF NOT EXISTS`` for ``table``) on an asyncpg connection, one
    starter at a time. Inside the caller's transaction it joins it, and others starting
    meanwhile wait for that transaction's end (the lock lasts as long as it)."""
    async with contextlib.AsyncExitStack() as stack:
        if not conn.is_in_transaction():
            await stack.enter_async_context(conn.transaction())
        await conn.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext(current_schema() || '.' || $2))", _PG_SCHEMA_LOCK, table
        )
        await conn.execute(ddl)


ClaimResult = Literal["claimed", "done", "busy"]


class Claim(Protocol):
    """One message's hold on its dedup key, from claim to outcome."""

    @property
    def status(self) -> ClaimResult: ...

    @property
    def transaction(self) -> object | None:
        """The open database connection of a transactional store, else None."""
        ...

    def attempt(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Scope of one handler try: a savepoint in transactional stores, so a failed try's
        writes are undone before the next one."""
        ...

    def complete(self) -> Awaitable[None]:
        """Mark done (and commit the handler's writes, in a transactional store); the awaitable
        resolves once that is durable. May be a future rather than a coroutine: every layer of
        coroutines between the runtime and the store's commit is resumed on every message."""
        ...

    async def extend(self, lease_s: float) -> None:
        """Renew the lease while the handler runs (a no-op for lock-based claims)."""
        ...

    async def release(self) -> None:
        """Give the key up (and roll back, in a transactional store). Idempotent."""
        ...


class DedupStore(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def claim(self, agent: str, key: str, *, lease_s: float) -> ClaimResult: ...
    def complete(self, agent: str, key: str) -> Awaitable[None]:
        """Mark ``key`` done; resolves once durable (an ``async def`` or a plain method
        returning a future)."""
        ...

    async def release(self, agent: str, key: str) -> None: ...
    async def extend(self, agent: str, key: str, *, lease_s: float) -> None: ...
    async def cleanup(self, *, older_than_s: float) -> int:
        """Delete done keys completed more than ``older_than_s`` ago; return how many."""
        ...

    def begin(self, agent: str, key: str, *, lease_s: float) -> Awaitable[Claim]:
        """Try to claim ``key``: the :class:`Claim`, whose status says whether it is ours."""
        ...


class _NoScope(contextlib.AbstractAsyncContextManager[None]):
    """A reusable no-op ``async with`` (cheaper than a generator-based context manager)."""

    async def __aexit__(self, *_: object) -> None:
        return None


_NO_SCOPE = _NoScope()


class LeaseClaim:
    """A :class:`Claim` over a store's claim / complete / release with a lease."""

    __slots__ = ("_agent", "_key", "_settled", "_status", "_store")

    def __init__(self, store: DedupStore, agent: str, key: str, status: ClaimResult) -> None:
        self._store = store
        self._agent = agent
        self._key = key
        self._status: ClaimResult = status
        self._settled = status != "claimed"

    @property
    def status(self) -> ClaimResult:
        return self._status

    @property
    def transaction(self) -> object | None:
        return None

    def attempt(self) -> contextlib.AbstractAsyncContextManager[None]:
        return _NO_SCOPE  # lease claims have nothing to undo between tries

    def complete(self) -> Awaitable[None]:
        self._settled = True
        return self._store.complete(self._agent, self._key)  # the store's own awaitable: no layer of ours

    async def release(self) -> None:
        if not self._settled:
            self._settled = True
            await self._store.release(self._agent, self._key)

    async def extend(self, lease_s: float) -> None:
        if not self._settled:
            await self._store.extend(self._agent, self._key, lease_s=lease_s)


class LeaseStoreMixin:
    """Gives a store with claim/complete/release the :meth:`DedupStore.begin` method."""

    async def begin(self: DedupStore, agent: str, key: str, *, lease_s: float) -> Claim:
        return LeaseClaim(self, agent, key, await self.claim(agent, key, lease_s=lease_s))
