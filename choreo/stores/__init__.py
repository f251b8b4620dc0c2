"""Dedup stores behind one interface (see :mod:`choreo.stores.base` for the contract)."""

from .base import ClaimResult, DedupStore
from .memory import MemoryDedupStore
from .sqlite import SQLiteDedupStore

__all__ = ["ClaimResult", "DedupStore", "MemoryDedupStore", "SQLiteDedupStore"]
