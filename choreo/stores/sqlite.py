"""The default dedup store: one SQLite file per host (WAL mode); and :func:`connect`, the same
connection set-up for an agent's own state (the example agents use it).

SQLite calls are short local writes, so they run inline on the event loop rather than on a
thread (a thread hop costs more than the write). ``synchronous=NORMAL`` in WAL mode keeps a
committed mark across a process crash (``kill -9``); only an OS crash can lose the last
commits, which then re-run as at-least-once deliveries and are absorbed by handler idempotency.

One write transaction per event-loop turn, committed at the start of the next turn. Releases
and renewals run at once inside it; the turn's claims and completions are queued and run
just before the commit, as one statement each for all of them (new keys, the common case,
need no per-key round trip). :meth:`claim` and
:meth:`complete` return only after that commit, so a handler still runs only on a durable
claim and a message is still acked only after its durable mark; the commit, not the
guarantee, is shared by every delivery that reaches the store in that turn. Stores
of one process on the same file share the connection and its transaction (a second
connection would wait on the first one's write lock while the loop cannot commit it).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .. import codec
from ..log import get_logger
from .base import Claim, ClaimResult, DedupStore, LeaseClaim

__all__ = ["Connection", "SQLiteDedupStore", "connect"]

log = get_logger("choreo.stores.sqlite")

_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS choreo_dedup (
    agent TEXT NOT NULL,
    key TEXT NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    lease_until REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (agent, key)
) WITHOUT ROWID;
DROP INDEX IF EXISTS choreo_dedup_done_at;
CREATE INDEX IF NOT EXISTS choreo_dedup_done ON choreo_dedup (updated_at) WHERE done = 1;
"""
# The index serves the hourly cleanup of done keys only, so it is partial: a claim's insert
# does not touch it, and a completion adds one entry. Files from before had an index over
# every row (choreo_dedup_done_at); opening one drops it.


class _Checkpointer:
    """Checkpoints the WAL from a thread with its own connection, every ``every_s``.

    SQLite otherwise checkpoints inside a commit once the WAL holds 1000 pages, and that
    commit, on the event loop, then waits for the checkpoint's fsyncs: milliseconds in which no
    message of the process moves. A passive checkpoint never blocks the writer, and the
    sqlite3 module lets go of the GIL while it runs. The loop's connection keeps a high
    auto-checkpoint limit as a backstop should this thread ever stall.
    """

    def __init__(self, path: Path, every_s: float = 0.5) -> None:
        self._path = path
        self._every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="choreo-sqlite-checkpoint", daemon=True)
        self.checkpoints = 0

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        db: sqlite3.Connection | None = None
        failed = False
        while not self._stop.wait(self._every_s):
            try:
                if db is None:  # read-write, never create: the file is the connection's own
                    db = sqlite3.connect(f"{self._path.as_uri()}?mode=rw", uri=True, isolation_level=None)
                db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                self.checkpoints += 1
                failed = False
            except sqlite3.Error as exc:  # the backstop limit still bounds the WAL
                if not failed:
                    log.warning("WAL checkpoint failed; retrying", path=str(self._path), error=repr(exc))
                failed = True
        if db is not None:
            db.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def stop_soon(self) -> None:
        """Stop without waiting (from a finalizer, which must not block)."""
        self._stop.set()


# Pages in the WAL before the loop's own connection checkpoints (SQLite's default is 1000);
# normally the checkpointer thread has long done it.
_BACKSTOP_PAGES = 20_000


class Connection(sqlite3.Connection):
    """A connection made by :func:`connect`; :meth:`close` also stops its checkpointer thread."""

    checkpointer: _Checkpointer | None = None

    def close(self) -> None:
        checkpointer, self.checkpointer = self.checkpointer, None
        if checkpointer is not None:
            checkpointer.stop()  # before the close, which checkpoints the rest itself
        super().close()


def connect(path: str | Path, *, background_checkpoints: bool = True) -> Connection:
    """A SQLite connection set up as choreo uses it: autocommit, WAL, synchronous=NORMAL, and a
    busy timeout so replicas on one host sharing the file wait for each other's writes.

    With ``background_checkpoints`` (the default), a thread checkpoints the WAL every 0.5 s on a
    connection of its own and this one only past a backstop of pages, so that no commit made on
    the event loop waits for a checkpoint's fsyncs. The thread ends with
    :meth:`Connection.close`, which waits for a checkpoint under way, or when the connection is
    garbage-collected. It is not started for a database without a file (``:memory:``) or not in
    WAL mode, and does not survive ``fork()``: connect in the process that uses the connection.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, factory=Connection)
    wal = db.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA busy_timeout=5000")
    # The file SQLite opened, as an absolute path ('' without one): a later chdir() or a
    # relative ``path`` cannot point the thread at another file.
    file = next((row[2] for row in db.execute("PRAGMA database_list") if row[1] == "main"), "")
    if background_checkpoints and wal and file:
        db.execute(f"PRAGMA wal_autocheckpoint={_BACKSTOP_PAGES}")
        checkpointer = db.checkpointer = _Checkpointer(Path(file))
        checkpointer.start()
        weakref.finalize(db, checkpointer.stop_soon)
    return db


class _TurnTransaction:
    """The write transaction of the current event-loop turn on one connection.

    Claims and completions are queued during the turn and run at its end as one statement each
    (per agent), just before the commit; other operations run at once. With a completion window,
    completions alone do not end the turn's transaction: they wait for the next commit that
    something else asks for (a claim, in a busy worker), for ``complete_batch`` of them, or for
    the window to pass. The batch keeps a consumer with a small prefetch from paying the whole
    window on every message: no claim can come while every unacked delivery waits for its mark.
    """

    __slots__ = (
        "_claims",
        "_completes",
        "_db",
        "_handle",
        "_later",
        "_waiters",
        "batched",
        "complete_batch",
        "complete_window_s",
    )

    def __init__(self, db: sqlite3.Connection, complete_window_s: float = 0.0, complete_batch: int = 1) -> None:
        self._db = db
        self.complete_window_s = complete_window_s
        self.complete_batch = max(1, complete_batch)
        # One statement for many keys needs RETURNING (SQLite 3.35) and json_each.
        self.batched = _can_batch(db)
        self._handle: asyncio.Handle | None = None  # the scheduled commit
        self._later = False  # the scheduled commit is the completion window's end, not this turn's
        # One future per waiter: a waiter cancelled (its delivery's channel closed) cancels its
        # own future only, never the others'.
        self._waiters: list[asyncio.Future[None]] = []
        # (agent, key, lease_s, future, owner): the future gets the owner's LeaseClaim.
        self._claims: list[tuple[str, str, float, asyncio.Future[Claim], DedupStore]] = []
        self._completes: list[tuple[str, str, asyncio.Future[None]]] = []

    def _begin(self) -> None:
        # SQLite's own state, not a flag of ours: an I/O error or a full disk can end the
        # transaction by itself.
        if not self._db.in_transaction:
            self._db.execute("BEGIN IMMEDIATE")
        self._schedule()

    def _schedule(self) -> None:
        """Commit at the end of this turn (bringing forward a completion window's commit)."""
        if self._handle is not None and self._later:
            self._handle.cancel()
            self._handle = None
        if self._handle is None:
            self._later = False
            self._handle = asyncio.get_running_loop().call_soon(self._commit)

    def _schedule_completion(self) -> None:
        if self._handle is not None and not self._later:
            return  # this turn's commit is coming anyway
        if self.complete_window_s <= 0 or len(self._completes) >= self.complete_batch:
            self._schedule()
            return
        if self._handle is not None:
            return  # the window's end is set already
        self._later = True
        self._handle = asyncio.get_running_loop().call_later(self.complete_window_s, self._commit)

    def run(self, op: Callable[..., _T], *args: Any) -> _T:
        """Run ``op(db, *args)`` now, in this turn's transaction (begun if need be)."""
        self._begin()
        return op(self._db, *args)

    def run_durably(self, op: Callable[..., _T], *args: Any) -> tuple[_T, asyncio.Future[None]]:
        """:meth:`run`, plus a future resolved once the transaction holding it is committed
        (failed if that commit failed)."""
        result = self.run(op, *args)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return result, waiter

    def begin(self, owner: DedupStore, agent: str, key: str, lease_s: float) -> asyncio.Future[Claim]:
        """``owner``'s :class:`LeaseClaim` for the key, once the claim is committed. A claim
        whose caller is gone (its future cancelled) by the end of the turn is not made, so it
        holds no lease."""
        future: asyncio.Future[Claim] = asyncio.get_running_loop().create_future()
        self._claims.append((agent, key, lease_s, future, owner))
        self._schedule()
        return future

    def complete(self, agent: str, key: str) -> asyncio.Future[None]:
        """Resolved once the key is committed as done (at most the completion window later)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._completes.append((agent, key, future))
        self._schedule_completion()
        return future

    def flush(self) -> None:
        """Commit now, if anything is pending (the last user closing the connection)."""
        if self._handle is not None:
            self._handle.cancel()
            self._commit()

    def _commit(self) -> None:
        self._handle = None
        self._later = False
        waiters, self._waiters = self._waiters, []
        claims, self._claims = [c for c in self._claims if not c[3].done()], []
        completes, self._completes = self._completes, []
        db = self._db
        if not (claims or completes or waiters or db.in_transaction):
            return  # only cancelled claims: no transaction (and no wait for the write lock)
        try:
            if not db.in_transaction:
                db.execute("BEGIN IMMEDIATE")
            results = _claim_many(db, [(agent, key, lease_s) for agent, key, lease_s, _, _ in claims], self.batched)
            _complete_many(db, [(agent, key) for agent, key, _ in completes], self.batched)
            db.execute("COMMIT")
        except Exception as exc:  # every operation of this turn is lost: their callers must know
            with contextlib.suppress(Exception):
                if db.in_transaction:
                    db.execute("ROLLBACK")
            failed: list[asyncio.Future[Any]] = [*waiters, *(c[3] for c in claims), *(c[2] for c in completes)]
            for future in failed:
                if not future.done():
                    future.set_exception(exc)
            return
        for (agent, key, _, claimed, owner), result in zip(claims, results, strict=True):
            if claimed.done():
                continue
            if isinstance(result, Exception):
                claimed.set_exception(result)
            else:
                claimed.set_result(LeaseClaim(owner, agent, key, result))
        for future in (*waiters, *(c[2] for c in completes)):
            if not future.done():
                future.set_result(None)


class _Shared:
    """One connection (and turn transaction) per file and process, counted by its users."""

    def __init__(self, db: Connection, complete_window_s: float = 0.0, complete_batch: int = 1) -> None:
        self.db = db
        self.txn = _TurnTransaction(db, complete_window_s, complete_batch)
        self.users = 0


_SHARED: dict[str, _Shared] = {}


def _claim(db: sqlite3.Connection, agent: str, key: str, lease_s: float) -> ClaimResult:
    now = time.time()
    # The common case, a key never seen: one plain insert.
    if db.execute(
        "INSERT OR IGNORE INTO choreo_dedup (agent, key, done, lease_until, updated_at) VALUES (?, ?, 0, ?, ?)",
        (agent, key, now + lease_s, now),
    ).rowcount:
        return "claimed"
    # Seen before: take it over only if it is not done and its lease ran out. In the same
    # transaction as the insert, so the row cannot change in between.
    if db.execute(
        "UPDATE choreo_dedup SET lease_until = ?, updated_at = ? "
        "WHERE agent = ? AND key = ? AND done = 0 AND lease_until <= ?",
        (now + lease_s, now, agent, key, now),
    ).rowcount:
        return "claimed"
    existing = db.execute("SELECT done FROM choreo_dedup WHERE agent = ? AND key = ?", (agent, key)).fetchone()
    return "done" if existing[0] else "busy"


def _can_batch(db: sqlite3.Connection) -> bool:
    if sqlite3.sqlite_version_info < (3, 35, 0):
        return False
    try:
        db.execute("SELECT value FROM json_each('[\"k\"]')").fetchall()
    except sqlite3.Error:  # built without JSON support
        return False
    return True


def _batchable(keys: list[str]) -> bytes | None:
    """``keys`` as the JSON array json_each reads, or None when one of them cannot go that way:
    not encodable, or holding a NUL (json_each's text ends at the first one)."""
    if any("\x00" in key for key in keys):
        return None
    try:
        return codec.dumps(keys)
    except TypeError:
        return None


def _claim_many(
    db: sqlite3.Connection, claims: list[tuple[str, str, float]], batched: bool = True
) -> list[ClaimResult | Exception]:
    """:func:`_claim` for many keys: new keys (the common case) with one insert per agent. A key
    that cannot be stored (say, text SQLite cannot take) fails its own claim, not the others'."""
    now = time.time()
    inserted: set[tuple[str, str]] = set()
    by_agent: dict[tuple[str, float], list[str]] = {}
    for agent, key, lease_s in claims:
        by_agent.setdefault((agent, lease_s), []).append(key)
    if batched and len(claims) > 1:
        for (agent, lease_s), keys in by_agent.items():
            keys_json = _batchable(keys)
            if keys_json is None:  # this group takes the per-key path
                continue
            # RETURNING lists only the rows inserted: keys seen before (or twice here) are not.
            rows = db.execute(_INSERT_MANY, (agent, now + lease_s, now, keys_json)).fetchall()
            inserted.update((agent, row[0]) for row in rows)
    results: list[ClaimResult | Exception] = []
    for agent, key, lease_s in claims:
        if (agent, key) in inserted:
            inserted.discard((agent, key))  # a second claim of the key in this turn is not the winner
            results.append("claimed")
            continue
        try:
            results.append(_claim(db, agent, key, lease_s))
        except (sqlite3.InterfaceError, sqlite3.DataError, UnicodeError) as exc:
            results.append(exc)
    return results


def _complete_many(db: sqlite3.Connection, completes: list[tuple[str, str]], batched: bool = True) -> None:
    """Mark many keys done: one upsert per agent (the insert covers a row deleted by hand)."""
    if not batched or len(completes) <= 1:
        for agent, key in completes:
            _complete(db, agent, key)
        return
    now = time.time()
    by_agent: dict[str, list[str]] = {}
    for agent, key in completes:
        by_agent.setdefault(agent, []).append(key)
    for agent, keys in by_agent.items():
        keys_json = _batchable(keys)
        if keys_json is None:  # one by one
            for key in keys:
                _complete(db, agent, key)
            continue
        db.execute(_COMPLETE_MANY, (agent, now, now, keys_json))


_INSERT_MANY = (
    "INSERT OR IGNORE INTO choreo_dedup (agent, key, done, lease_until, updated_at) "
    "SELECT ?, value, 0, ?, ? FROM json_each(?) WHERE true RETURNING key"
)
# "WHERE true" keeps SQLite from reading ON CONFLICT as part of the SELECT's join.
_COMPLETE_MANY = (
    "INSERT INTO choreo_dedup (agent, key, done, lease_until, updated_at) "
    "SELECT ?, value, 1, ?, ? FROM json_each(?) WHERE true "
    "ON CONFLICT (agent, key) DO UPDATE SET done = 1, updated_at = excluded.updated_at"
)


def _complete(db: sqlite3.Connection, agent: str, key: str) -> None:
    now = time.time()
    # The claim's row exists (it is ours); the insert covers a row deleted meanwhile by hand.
    if not db.execute(
        "UPDATE choreo_dedup SET done = 1, updated_at = ? WHERE agent = ? AND key = ?", (now, agent, key)
    ).rowcount:
        db.execute(
            "INSERT INTO choreo_dedup (agent, key, done, lease_until, updated_at) VALUES (?, ?, 1, ?, ?)",
            (agent, key, now, now),
        )


class SQLiteDedupStore:
    """``complete_window_s``: how long a completion may wait to share a commit (with the next
    claims, or with other completions) before it is committed on its own; 0 commits it at the
    end of its loop turn. ``complete_batch`` completions waiting commit at once (a quarter of
    the consumer's prefetch: see :class:`_TurnTransaction`). :meth:`complete` returns only once
    the mark is committed either way. Stores of one process on the same file share one
    transaction and the first one's window and batch.

    :meth:`begin` and :meth:`complete` return the turn's future itself, not a coroutine: they
    queue their work when called (inside a running loop), and the future resolves once it is
    committed. Await it; ``asyncio.create_task`` does not take it (``ensure_future`` does).
    """

    def __init__(self, path: str | Path, *, complete_window_s: float = 0.0, complete_batch: int = 1) -> None:
        self.path = Path(path)
        self.complete_window_s = complete_window_s
        self.complete_batch = complete_batch
        self._shared: _Shared | None = None

    @property
    def db(self) -> sqlite3.Connection:
        return self._open_shared().db

    def _open_shared(self) -> _Shared:
        if self._shared is None:
            raise RuntimeError("SQLiteDedupStore is not open")
        return self._shared

    async def open(self) -> None:
        if self._shared is not None:
            return
        key = str(self.path.resolve())
        shared = _SHARED.get(key)
        if shared is None:
            db = connect(self.path)
            db.executescript(_SCHEMA)
            shared = _SHARED[key] = _Shared(db, self.complete_window_s, self.complete_batch)
        shared.users += 1
        self._shared = shared

    async def close(self) -> None:
        shared, self._shared = self._shared, None
        if shared is None:
            return
        shared.users -= 1
        if shared.users == 0:
            shared.txn.flush()
            shared.db.close()  # stops its checkpointer thread too
            _SHARED.pop(str(self.path.resolve()), None)

    def begin(self, agent: str, key: str, *, lease_s: float) -> asyncio.Future[Claim]:
        # The turn's future itself, resolved with the claim by the commit: no coroutine of ours
        # between the runtime and the commit (LeaseStoreMixin.begin is one).
        return self._open_shared().txn.begin(self, agent, key, lease_s)

    async def claim(self, agent: str, key: str, *, lease_s: float) -> ClaimResult:
        claim = await self.begin(agent, key, lease_s=lease_s)  # a handler runs only on a committed claim
        return claim.status

    def complete(self, agent: str, key: str) -> asyncio.Future[None]:
        # The turn's future itself (resolved by its commit), so the caller, which acks only after
        # that commit, resumes through no coroutine of the store's.
        return self._open_shared().txn.complete(agent, key)

    async def release(self, agent: str, key: str) -> None:
        # Not waited for: a release lost to a failed commit ends with the lease instead.
        self._open_shared().txn.run(_release, agent, key)

    async def extend(self, agent: str, key: str, *, lease_s: float) -> None:
        self._open_shared().txn.run(_extend, agent, key, lease_s)

    async def cleanup(self, *, older_than_s: float) -> int:
        removed, committed = self._open_shared().txn.run_durably(_cleanup, time.time() - older_than_s)
        await committed
        return removed


def _release(db: sqlite3.Connection, agent: str, key: str) -> None:
    db.execute("DELETE FROM choreo_dedup WHERE agent = ? AND key = ? AND done = 0", (agent, key))


def _extend(db: sqlite3.Connection, agent: str, key: str, lease_s: float) -> None:
    now = time.time()
    db.execute(
        "UPDATE choreo_dedup SET lease_until = ?, updated_at = ? WHERE agent = ? AND key = ? AND done = 0",
        (now + lease_s, now, agent, key),
    )


def _cleanup(db: sqlite3.Connection, before: float) -> int:
    return db.execute("DELETE FROM choreo_dedup WHERE done = 1 AND updated_at < ?", (before,)).rowcount
