"""A dedup store in a dict: for unit tests and the in-memory demo (nothing survives a restart)."""

from __future__ import annotations

import time

from .base import ClaimResult, LeaseStoreMixin

__all__ = ["MemoryDedupStore"]


class MemoryDedupStore(LeaseStoreMixin):
    def __init__(self) -> None:
        # (agent, key) -> (done, lease_until or completed_at)
        self._rows: dict[tuple[str, str], tuple[bool, float]] = {}

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def claim(self, agent: str, key: str, *, lease_s: float) -> ClaimResult:
        now = time.time()
        row = self._rows.get((agent, key))
        if row is not None:
            done, until = row
            if done:
                return "done"
            if until > now:
                return "busy"
        self._rows[(agent, key)] = (False, now + lease_s)
        return "claimed"

    async def complete(self, agent: str, key: str) -> None:
        self._rows[(agent, key)] = (True, time.time())

    async def release(self, agent: str, key: str) -> None:
        row = self._rows.get((agent, key))
        if row is not None and not row[0]:
            del self._rows[(agent, key)]

    async def extend(self, agent: str, key: str, *, lease_s: float) -> None:
        row = self._rows.get((agent, key))
        if row is not None and not row[0]:
            self._rows[(agent, key)] = (False, time.time() + lease_s)

    async def cleanup(self, *, older_than_s: float) -> int:
        cutoff = time.time() - older_than_s
        stale = [k for k, (done, at) in self._rows.items() if done and at < cutoff]
        for k in stale:
            del self._rows[k]
        return len(stale)
