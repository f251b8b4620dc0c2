"""The default dedup store: one SQLite file per host (WAL mode).

SQLite calls are short local writes, so they run inline on the event loop rather than on a
thread (a thread hop costs more than the write). ``synchronous=NORMAL`` in WAL mode keeps a
committed mark across a process crash (``kill -9``); only an OS crash can lose the last
commits, which then re-run as at-least-once deliveries and are absorbed by handler idempotency.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

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


class SQLiteDedupStore(LeaseStoreMixin):
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None

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

    async def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def claim(self, agent: str, key: str, *, lease_s: float) -> ClaimResult:
        now = time.time()
        row = self.db.execute(
            "INSERT INTO choreo_dedup (agent, key, done, lease_until, updated_at) VALUES (?, ?, 0, ?, ?) "
            "ON CONFLICT (agent, key) DO UPDATE "
            "SET lease_until = excluded.lease_until, updated_at = excluded.updated_at "
            "WHERE choreo_dedup.done = 0 AND choreo_dedup.lease_until <= excluded.updated_at "
            "RETURNING done",
            (agent, key, now + lease_s, now),
        ).fetchone()
        if row is not None:
            return "claimed"
        existing = self.db.execute("SELECT done FROM choreo_dedup WHERE agent = ? AND key = ?", (agent, key)).fetchone()
        if existing is None:  # released between the two statements
            return await self.claim(agent, key, lease_s=lease_s)
        return "done" if existing[0] else "busy"

    async def complete(self, agent: str, key: str) -> None:
        now = time.time()
        self.db.execute(
            "INSERT INTO choreo_dedup (agent, key, done, lease_until, updated_at) VALUES (?, ?, 1, ?, ?) "
            "ON CONFLICT (agent, key) DO UPDATE SET done = 1, updated_at = excluded.updated_at",
            (agent, key, now, now),
        )

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
