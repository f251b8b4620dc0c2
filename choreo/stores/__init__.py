"""Dedup stores behind one interface (see :mod:`choreo.stores.base` for the contract).

``CHOREO_DEDUP_URL`` picks one: ``sqlite:`` (default: a file per agent in the state
directory) or ``sqlite:///path/file.db``, ``postgresql://...`` (add
``CHOREO_DEDUP_TRANSACTIONAL=1`` for the transactional inbox), ``redis://...``, ``memory:``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConfigError
from .base import Claim, ClaimResult, DedupStore, LeaseClaim
from .memory import MemoryDedupStore
from .sqlite import SQLiteDedupStore

if TYPE_CHECKING:
    from ..config import Settings

__all__ = [
    "Claim",
    "ClaimResult",
    "DedupStore",
    "LeaseClaim",
    "MemoryDedupStore",
    "SQLiteDedupStore",
    "dedup_store_for",
]


def dedup_store_for(settings: Settings, agent: str) -> DedupStore:
    """The store ``settings.dedup_url`` names, for ``agent``."""
    url = settings.dedup_url or "sqlite:"
    scheme = url.split(":", 1)[0].lower()
    if scheme == "sqlite":
        path = url[len("sqlite://") :] if url.startswith("sqlite://") else ""
        return SQLiteDedupStore(
            path or settings.state_dir / f"{agent}.dedup.sqlite3",
            complete_window_s=settings.settle_window_ms / 1000,
            complete_batch=settings.prefetch // 4,  # as the transport's acks
        )
    if scheme in {"postgres", "postgresql"}:
        from .postgres import PostgresDedupStore

        return PostgresDedupStore(url, transactional=settings.dedup_transactional)
    if scheme in {"redis", "rediss"}:
        from .redis import RedisDedupStore

        return RedisDedupStore(url, retention_s=settings.dedup_retention_s)
    if scheme == "memory":
        return MemoryDedupStore()
    raise ConfigError(f"CHOREO_DEDUP_URL {url!r}: expected sqlite:, postgresql://, redis:// or memory:")
