"""The dedup store interface: claim-then-commit with a lease, keyed by (agent, dedup_key).

Contract:
- :meth:`claim` returns ``"claimed"`` to exactly one caller at a time; others get ``"busy"``
  while the lease runs, or ``"done"`` once the key is completed. An expired lease (its holder
  crashed) can be claimed again.
- :meth:`complete` marks the key done; it is called only after the handler succeeded and its
  emitted events were confirmed, so "done" means "its effects exist".
- :meth:`release` drops a claim after a failure so the message can be tried again.
- Done keys are kept for the retention window, then :meth:`cleanup` removes them.
"""

from __future__ import annotations

from typing import Literal, Protocol

__all__ = ["ClaimResult", "DedupStore"]

ClaimResult = Literal["claimed", "done", "busy"]


class DedupStore(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def claim(self, agent: str, key: str, *, lease_s: float) -> ClaimResult: ...
    async def complete(self, agent: str, key: str) -> None: ...
    async def release(self, agent: str, key: str) -> None: ...
    async def cleanup(self, *, older_than_s: float) -> int:
        """Delete done keys completed more than ``older_than_s`` ago; return how many."""
        ...
