"""The SQLite store's turn transaction: operations of one loop turn share a commit, callers
resume only after it, and one caller's cancellation never touches the others."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from choreo.stores import SQLiteDedupStore


def committed_done(path: Path, agent: str, key: str) -> bool:
    """Read through a second connection: only committed rows are visible there."""
    with sqlite3.connect(path) as other:
        row = other.execute("SELECT done FROM choreo_dedup WHERE agent = ? AND key = ?", (agent, key)).fetchone()
    return bool(row and row[0])


async def test_complete_returns_only_after_the_commit_and_a_cancelled_caller_does_not_affect_others(
    tmp_path: Path,
) -> None:
    path = tmp_path / "dedup.sqlite3"
    store = SQLiteDedupStore(path)
    await store.open()
    try:
        for key in ("a", "b", "c"):
            assert await store.claim("agent", key, lease_s=30) == "claimed"
        # Three completions in one turn; one of their callers is cancelled while it waits.
        tasks = [asyncio.create_task(store.complete("agent", key)) for key in ("a", "b", "c")]
        await asyncio.sleep(0)  # all three ran their update and wait for the commit
        assert not any(committed_done(path, "agent", k) for k in ("a", "b", "c"))
        tasks[1].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert results[0] is None
        assert results[2] is None
        assert isinstance(results[1], asyncio.CancelledError)
        # The cancelled caller's update was in the same transaction, which committed.
        assert all(committed_done(path, "agent", k) for k in ("a", "b", "c"))
    finally:
        await store.close()


async def test_stores_of_one_process_on_one_file_share_the_connection(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite3"
    first, second = SQLiteDedupStore(path), SQLiteDedupStore(path)
    await first.open()
    await second.open()
    try:
        assert first.db is second.db  # a second connection would deadlock on the first's write lock
        assert await first.claim("agent", "k", lease_s=30) == "claimed"
        assert await second.claim("agent", "k", lease_s=30) == "busy"
    finally:
        await first.close()
        assert await second.claim("agent", "k2", lease_s=30) == "claimed"  # still open for the other
        await second.close()
    with pytest.raises(RuntimeError):
        second.db  # noqa: B018
