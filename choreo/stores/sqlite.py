"""The default dedup store: one SQLite file per host (WAL mode).

SQLite calls are short local writes, so they run inline on the event loop rather than on a
thread (a thread hop costs more than the write). ``synchronous=NORMAL`` in WAL mode keeps a
committed mark across a process crash (``kill -9``); only an OS crash can lose the last
commits, which then re-run as at-least-once deliveries and are absorbed by handler idempotency.

Group commit: claims and completions requested in the same event-loop turn (a burst of
deliveries, handlers finishing together) run in one transaction, committed before any of their
callers resumes. A caller of :meth:`complete` therefore still acks only after its mark is
committed; the commit, not the guarantee, is shared.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .base import ClaimResult, LeaseStoreMixin

__all__ = ["SQLiteDedupStore", "connect"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS choreo_dedup (
    agent TEXT NOT NULL,
    key TEXT NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    lease_until REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (agent, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS choreo_dedup_done_at ON choreo_dedup (done, updated_at);
"""


def connect(path: str | Path) -> sqlite3.Connection:
    """A SQLite connection set up as choreo uses it: autocommit, WAL, synchronous=NORMAL, and a
    busy timeout so replicas on one host sharing the file wait for each other's writes."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA busy_timeout=5000")
    return db


_Op = Callable[[sqlite3.Connection], Any]


class _GroupCommit:
    """Runs the operations queued during one event-loop turn in one transaction."""

    __slots__ = ("_db", "_pending", "_scheduled")

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._pending: list[tuple[_Op, asyncio.Future[Any]]] = []
        self._scheduled = False

    def submit(self, op: _Op) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((op, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._scheduled = False
        batch, self._pending = self._pending, []
        db = self._db
        results: list[Any] = []
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                results = [op(db) for op, _ in batch]
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except Exception as exc:  # every caller of this batch sees the failure; none was committed
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():  # its caller may have been cancelled meanwhile
                future.set_result(result)


def _claim(db: sqlite3.Connection, agent: str, key: str, lease_s: float) -> ClaimResult:
    now = time.time()
    row = db.execute(
        "INSERT INTO choreo_dedup (agent, key, done, lease_until, updated_at) VALUES (?, ?, 0, ?, ?) "
        "ON CONFLICT (agent, key) DO UPDATE "
        "SET lease_until = excluded.lease_until, updated_at = excluded.updated_at "
        "WHERE choreo_dedup.done = 0 AND choreo_dedup.lease_until <= excluded.updated_at "
        "RETURNING done",
        (agent, key, now + lease_s, now),
    ).fetchone()
    if row is not None:
        return "claimed"
    # In the same transaction as the insert, so the row cannot vanish in between.
    existing = db.execute("SELECT done FROM choreo_dedup WHERE agent = ? AND key = ?", (agent, key)).fetchone()
    return "done" if existing[0] else "busy"


def _complete(db: sqlite3.Connection, agent: str, key: str) -> None:
    now = time.time()
    db.execute(
        "INSERT INTO choreo_dedup (agent, key, done, lease_until, updated_at) VALUES (?, ?, 1, ?, ?) "
        "ON CONFLICT (agent, key) DO UPDATE SET done = 1, updated_at = excluded.updated_at",
        (agent, key, now, now),
    )


class SQLiteDedupStore(LeaseStoreMixin):
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        self._group: _GroupCommit | None = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("SQLiteDedupStore is not open")
        return self._db

    async def open(self) -> None:
        if self._db is not None:
            return
        db = connect(self.path)
        db.executescript(_SCHEMA)
        self._db = db
        self._group = _GroupCommit(db)

    async def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
            self._group = None

    @property
    def group(self) -> _GroupCommit:
        if self._group is None:
            raise RuntimeError("SQLiteDedupStore is not open")
        return self._group

    async def claim(self, agent: str, key: str, *, lease_s: float) -> ClaimResult:
        result: ClaimResult = await self.group.submit(lambda db: _claim(db, agent, key, lease_s))
        return result

    async def complete(self, agent: str, key: str) -> None:
        await self.group.submit(lambda db: _complete(db, agent, key))

    async def release(self, agent: str, key: str) -> None:
        self.db.execute("DELETE FROM choreo_dedup WHERE agent = ? AND key = ? AND done = 0", (agent, key))

    async def extend(self, agent: str, key: str, *, lease_s: float) -> None:
        now = time.time()
        self.db.execute(
            "UPDATE choreo_dedup SET lease_until = ?, updated_at = ? WHERE agent = ? AND key = ? AND done = 0",
            (now + lease_s, now, agent, key),
        )

    async def cleanup(self, *, older_than_s: float) -> int:
        cur = self.db.execute(
            "DELETE FROM choreo_dedup WHERE done = 1 AND updated_at < ?", (time.time() - older_than_s,)
        )
        return cur.rowcount
