"""The SQLite store's turn transaction: operations of one loop turn share a commit, callers
resume only after it, and one caller's cancellation never touches the others."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from choreo.stores import SQLiteDedupStore
from choreo.stores import sqlite as sqlite_module
from choreo.testing import wait_for

from ..conftest import turns


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
        async def caller(key: str) -> None:
            await store.complete("agent", key)

        tasks = [asyncio.create_task(caller(key)) for key in ("a", "b", "c")]
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


def committed_rows(path: Path) -> dict[tuple[str, str], int]:
    with sqlite3.connect(path) as other:
        return {(a, k): d for a, k, d in other.execute("SELECT agent, key, done FROM choreo_dedup")}


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteDedupStore]:
    """An open store on a fresh file (``store.path``), closed after the test."""
    opened = SQLiteDedupStore(tmp_path / "dedup.sqlite3")
    await opened.open()
    yield opened
    await opened.close()


async def test_a_turns_claims_run_together_and_each_gets_its_own_answer(tmp_path: Path) -> None:
    path = tmp_path / "dedup.sqlite3"
    store, other_agent = SQLiteDedupStore(path), SQLiteDedupStore(path)
    await store.open()
    await other_agent.open()
    try:
        assert await store.claim("agent", "done", lease_s=30) == "claimed"
        await store.complete("agent", "done")
        assert await store.claim("agent", "held", lease_s=30) == "claimed"
        assert await store.claim("agent", "expired", lease_s=-1) == "claimed"  # its lease has run out: a crashed holder
        keys = ["new1", "done", "new2", "held", "new1", "expired", "new3"]
        answers = await asyncio.gather(
            *(store.claim("agent", key, lease_s=30) for key in keys),
            other_agent.claim("other", "new1", lease_s=30),  # same key, other agent: its own row
        )
        assert answers == ["claimed", "done", "claimed", "busy", "busy", "claimed", "claimed", "claimed"]
        rows = committed_rows(path)
        assert all(rows[("agent", k)] == 0 for k in ("new1", "new2", "new3", "held", "expired"))
        assert rows[("other", "new1")] == 0
    finally:
        await other_agent.close()
        await store.close()


async def test_a_claim_cancelled_before_the_turn_ends_takes_no_lease(store: SQLiteDedupStore) -> None:
    gone = asyncio.create_task(store.claim("agent", "k", lease_s=30))
    kept = asyncio.create_task(store.claim("agent", "k2", lease_s=30))
    await asyncio.sleep(0)  # both are queued in this turn
    gone.cancel()
    assert await kept == "claimed"
    assert ("agent", "k") not in committed_rows(store.path)
    assert await store.claim("agent", "k", lease_s=30) == "claimed"  # not held by a lost caller


async def test_a_turns_completions_run_together_and_cover_a_row_deleted_by_hand(store: SQLiteDedupStore) -> None:
    for key in ("a", "b", "c"):
        assert await store.claim("agent", key, lease_s=30) == "claimed"
    store.db.execute("DELETE FROM choreo_dedup WHERE key = 'b'")  # an operator's hand
    await asyncio.gather(*(store.complete("agent", key) for key in ("a", "b", "c")))
    assert committed_rows(store.path) == {("agent", "a"): 1, ("agent", "b"): 1, ("agent", "c"): 1}
    assert await store.claim("agent", "b", lease_s=30) == "done"


async def test_a_failed_turn_fails_every_caller_and_keeps_nothing(
    store: SQLiteDedupStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert await store.claim("agent", "old", lease_s=30) == "claimed"

    def disk_full(*_: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(sqlite_module, "_complete_many", disk_full)
    results = await asyncio.gather(
        store.claim("agent", "new", lease_s=30), store.complete("agent", "old"), return_exceptions=True
    )
    assert all(isinstance(r, sqlite3.OperationalError) for r in results)
    assert committed_rows(store.path) == {("agent", "old"): 0}  # the turn's claim was rolled back
    monkeypatch.undo()
    assert await store.claim("agent", "new", lease_s=30) == "claimed"  # the store still works


async def test_opening_a_file_with_the_old_full_index_replaces_it(tmp_path: Path) -> None:
    path = tmp_path / "dedup.sqlite3"
    with sqlite3.connect(path) as old:
        old.executescript(
            "CREATE TABLE choreo_dedup (agent TEXT NOT NULL, key TEXT NOT NULL, done INTEGER NOT NULL DEFAULT 0, "
            "lease_until REAL NOT NULL, updated_at REAL NOT NULL, PRIMARY KEY (agent, key)) WITHOUT ROWID;"
            "CREATE INDEX choreo_dedup_done_at ON choreo_dedup (done, updated_at);"
            "INSERT INTO choreo_dedup VALUES ('agent', 'k', 1, 0, 0);"
        )
    store = SQLiteDedupStore(path)
    await store.open()
    try:
        indexes = {row[0] for row in store.db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "choreo_dedup_done_at" not in indexes
        assert "choreo_dedup_done" in indexes
        assert await store.claim("agent", "k", lease_s=30) == "done"  # the rows are kept
        assert await store.cleanup(older_than_s=1) == 1
    finally:
        await store.close()


async def test_a_key_sqlite_cannot_store_fails_its_own_claim_only(store: SQLiteDedupStore) -> None:
    bad = "lone \ud800 surrogate"  # neither JSON nor SQLite's UTF-8 can carry it
    results = await asyncio.gather(
        store.claim("agent", "good", lease_s=30), store.claim("agent", bad, lease_s=30), return_exceptions=True
    )
    assert results[0] == "claimed"
    assert isinstance(results[1], UnicodeError)
    assert committed_rows(store.path) == {("agent", "good"): 0}


async def test_the_wal_is_checkpointed_off_the_event_loop_and_the_thread_ends_on_close(tmp_path: Path) -> None:
    path = tmp_path / "dedup.sqlite3"
    store = SQLiteDedupStore(path)
    await store.open()
    checkpointer = store.db.checkpointer
    assert checkpointer is not None
    try:
        # The loop's connection checkpoints only as a backstop, far beyond SQLite's 1000 pages.
        assert store.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == sqlite_module._BACKSTOP_PAGES
        size_before = path.stat().st_size
        for start in range(0, 3000, 300):
            await asyncio.gather(*(store.claim("agent", f"key-{n:06d}", lease_s=30) for n in range(start, start + 300)))
        # The rows reach the database file only through a checkpoint, and only the thread runs one.
        await wait_for(
            lambda: checkpointer.checkpoints > 0 and path.stat().st_size > size_before,
            within=10,
            what="the checkpointer thread to copy the WAL into the database file",
        )
    finally:
        await store.close()
    assert not checkpointer._thread.is_alive()


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per-key (SQLite < 3.35)"])
async def test_keys_with_a_nul_are_claimed_and_completed_as_themselves(store: SQLiteDedupStore, batched: bool) -> None:
    store._open_shared().txn.batched = batched
    keys = ["evt-1\x00x", "evt-1", "evt-2"]  # json_each would read the first as "evt-1"
    assert await asyncio.gather(*(store.claim("agent", k, lease_s=30) for k in keys)) == ["claimed"] * 3
    await asyncio.gather(store.complete("agent", "evt-1\x00x"), store.complete("agent", "evt-2"))
    assert committed_rows(store.path) == {("agent", "evt-1\x00x"): 1, ("agent", "evt-1"): 0, ("agent", "evt-2"): 1}


async def test_a_turn_with_only_cancelled_claims_opens_no_transaction(store: SQLiteDedupStore) -> None:
    statements: list[str] = []
    store.db.set_trace_callback(statements.append)
    gone = asyncio.create_task(store.claim("agent", "k", lease_s=30))
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.sleep(0)  # the turn's commit runs
    await asyncio.sleep(0)
    assert statements == []  # not even a BEGIN, which could wait for another replica's lock
    store.db.set_trace_callback(None)


def test_connect_checkpoints_on_a_thread_that_ends_with_close(tmp_path: Path) -> None:
    """Any connection from ``connect`` (the example agents' state uses it) keeps checkpoints
    off the caller's thread: a write lands in the database file with no checkpoint on it."""
    path = tmp_path / "state.sqlite3"
    db = sqlite_module.connect(path)
    checkpointer = db.checkpointer
    assert checkpointer is not None
    try:
        assert db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == sqlite_module._BACKSTOP_PAGES
        db.execute("CREATE TABLE t (n INTEGER)")
        size_before = path.stat().st_size
        db.execute("BEGIN")
        db.executemany("INSERT INTO t VALUES (?)", ((n,) for n in range(5000)))
        db.execute("COMMIT")
        wait_for_sync(
            lambda: checkpointer.checkpoints > 0 and path.stat().st_size > size_before,
            what="the checkpointer thread to copy the WAL into the database file",
        )
    finally:
        db.close()
    assert not checkpointer._thread.is_alive()
    assert db.checkpointer is None
    db.close()  # a second close is harmless


def test_connect_without_background_checkpoints_keeps_sqlites_own(tmp_path: Path) -> None:
    db = sqlite_module.connect(tmp_path / "plain.sqlite3", background_checkpoints=False)
    try:
        assert db.checkpointer is None
        assert db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
    finally:
        db.close()


def test_an_unclosed_connection_stops_its_checkpointer_when_collected(tmp_path: Path) -> None:
    db = sqlite_module.connect(tmp_path / "dropped.sqlite3")
    checkpointer = db.checkpointer
    assert checkpointer is not None
    del db
    gc.collect()
    wait_for_sync(lambda: not checkpointer._thread.is_alive(), what="the checkpointer thread to end")


def wait_for_sync(condition: Callable[[], bool], *, what: str, within: float = 10.0) -> None:
    """Poll ``condition`` from a plain test (no loop): the checkpointer works on its own thread."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        threading.Event().wait(0.01)


def test_the_checkpointer_follows_the_opened_file_not_a_relative_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    db = sqlite_module.connect("state.sqlite3")
    checkpointer = db.checkpointer
    assert checkpointer is not None
    try:
        monkeypatch.chdir(tmp_path / "b")  # a relative path would now name another file
        db.execute("CREATE TABLE t (n INTEGER)")
        db.execute("INSERT INTO t VALUES (1)")
        wait_for_sync(lambda: checkpointer.checkpoints > 0, what="a checkpoint")
    finally:
        db.close()
    assert not (tmp_path / "b" / "state.sqlite3").exists()  # the thread never creates a file


def test_no_checkpointer_without_a_file(tmp_path: Path) -> None:
    db = sqlite_module.connect(":memory:")
    try:
        assert db.checkpointer is None
    finally:
        db.close()


# -- the completion window: marks wait to share a commit -------------------------------------


@contextlib.asynccontextmanager
async def windowed(path: Path, window_s: float = 30.0, batch: int = 100) -> AsyncIterator[SQLiteDedupStore]:
    """An open store whose completions wait ``window_s`` (long by default: only something
    else's commit ends the wait) unless ``batch`` of them are waiting; closed afterwards."""
    store = SQLiteDedupStore(path, complete_window_s=window_s, complete_batch=batch)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def claimed(store: SQLiteDedupStore, *keys: str) -> None:
    for key in keys:
        assert await store.claim("agent", key, lease_s=30) == "claimed"


async def test_with_a_window_completions_ride_on_the_next_claims_commit(tmp_path: Path) -> None:
    path = tmp_path / "dedup.sqlite3"
    async with windowed(path) as store:
        await claimed(store, "a")
        completing = asyncio.ensure_future(store.complete("agent", "a"))
        await turns()
        assert not completing.done()  # waiting for company, not committed yet
        assert not committed_done(path, "agent", "a")
        await claimed(store, "b")  # the next delivery's claim
        async with asyncio.timeout(5):
            await completing
        assert committed_rows(path) == {("agent", "a"): 1, ("agent", "b"): 0}


async def test_with_a_window_a_lone_completion_commits_when_it_ends(tmp_path: Path) -> None:
    path = tmp_path / "dedup.sqlite3"
    async with windowed(path, window_s=0.02) as store:
        await claimed(store, "a")
        async with asyncio.timeout(5):
            await store.complete("agent", "a")
        assert committed_done(path, "agent", "a")


async def test_closing_the_store_commits_completions_still_in_their_window(tmp_path: Path) -> None:
    path = tmp_path / "dedup.sqlite3"
    async with windowed(path) as store:
        await claimed(store, "a")
        completing = asyncio.ensure_future(store.complete("agent", "a"))
        await asyncio.sleep(0)
    await completing  # the store closed (leaving the block) with the mark still waiting
    assert committed_done(path, "agent", "a")


def test_the_settle_window_reaches_the_dedup_store_and_the_workers_transport(tmp_path: Path) -> None:
    from choreo import Agent, Settings, Worker
    from choreo.stores import dedup_store_for

    settings = Settings.from_env({"CHOREO_SETTLE_WINDOW_MS": "25", "CHOREO_STATE_DIR": str(tmp_path)})
    assert settings.settle_window_ms == 25
    store = dedup_store_for(settings, "payments")
    assert isinstance(store, SQLiteDedupStore)
    assert store.complete_window_s == 0.025
    assert store.complete_batch == settings.prefetch // 4  # as the transport's acks
    assert Settings.from_env({}).settle_window_ms == 10  # on by default

    async def build() -> float:
        worker = Worker([Agent("payments")], settings=settings)
        return worker.transport.ack_window_s  # type: ignore[attr-defined, no-any-return]

    assert asyncio.run(build()) == 0.025


async def test_a_batch_of_waiting_completions_commits_without_waiting_for_the_window(tmp_path: Path) -> None:
    """With a small prefetch no claim can come while every unacked delivery waits for its
    mark: the batch (1 for a prefetch under 8) commits at the end of the turn instead."""
    path = tmp_path / "dedup.sqlite3"
    async with windowed(path, batch=2) as store:
        await claimed(store, "a", "b")
        first = asyncio.ensure_future(store.complete("agent", "a"))
        await turns()
        assert not first.done()  # one of two: waiting
        async with asyncio.timeout(5):
            await asyncio.gather(first, store.complete("agent", "b"))  # the second fills the batch
        assert committed_rows(path) == {("agent", "a"): 1, ("agent", "b"): 1}


async def test_any_other_write_brings_a_waiting_completion_forward(tmp_path: Path) -> None:
    path = tmp_path / "dedup.sqlite3"
    async with windowed(path) as store:
        await claimed(store, "a", "b")
        completing = asyncio.ensure_future(store.complete("agent", "a"))
        await asyncio.sleep(0)
        await store.release("agent", "b")  # runs at once in this turn's transaction
        async with asyncio.timeout(5):
            await completing
        assert committed_rows(path) == {("agent", "a"): 1}  # b's claim released, a done
