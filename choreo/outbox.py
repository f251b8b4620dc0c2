"""Transactional outbox: a service records events in its own database transaction, and a relay
publishes them.

Write the event in the same transaction as the state change it announces, so both commit or
neither does:

    with db:                                            # sqlite3: one transaction
        db.execute("INSERT INTO orders ...")
        choreo.outbox.write_sqlite(db, OrderPlaced(...), source="shop")

    async with pg.transaction():                        # asyncpg
        await pg.execute("INSERT INTO orders ...")
        await choreo.outbox.write_postgres(pg, OrderPlaced(...), source="shop")

Then run ``choreo outbox relay --db sqlite:///shop.db`` (or ``postgresql://...``): it publishes
unsent rows in insertion order, each confirmed by the broker before it is marked sent. The
envelope (and its id) is fixed when written, so a row re-published after a crash between
confirm and mark is the same event, absorbed by the consumers' dedup.

A row that can never be published (its body is not a valid envelope, or it cannot be encoded)
is logged as an error naming its ``seq`` and ``id``, left unsent in the table (nothing is
deleted or marked), and skipped by this relay process so the rows behind it still go out;
:attr:`Relay.failed` lists such rows, and ``choreo outbox relay --once`` exits 1 naming them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .config import Settings
from .envelope import Envelope
from .errors import ChoreoError, ConfigError, HeadersNotSendable, TransportError
from .events import Event
from .log import get_logger
from .publisher import new_envelope, to_message
from .stores.base import ensure_pg_schema
from .stores.sqlite import connect as sqlite_connect
from .transport.base import OutgoingMessage, Transport

__all__ = ["FailedRow", "OutboxError", "OutboxRow", "Relay", "open_outbox", "write_postgres", "write_sqlite"]

log = get_logger("choreo.outbox")
TABLE = "choreo_outbox"

# Separate statements: sqlite3's executescript() would COMMIT the caller's transaction first.
_SQLITE_SCHEMA = (
    f"""CREATE TABLE IF NOT EXISTS {TABLE} (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    body BLOB NOT NULL,
    created_at REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0),
    sent_at REAL
)""",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_unsent ON {TABLE} (seq) WHERE sent_at IS NULL",
)
_PG_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    seq bigserial PRIMARY KEY,
    id text NOT NULL UNIQUE,
    type text NOT NULL,
    body bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    sent_at timestamptz
);
CREATE INDEX IF NOT EXISTS {TABLE}_unsent ON {TABLE} (seq) WHERE sent_at IS NULL;
"""


def _envelope(event: Event, source: str, options: dict[str, Any]) -> Envelope:
    ttl = options.pop("ttl_ms", type(event).__event_ttl_ms__)
    return new_envelope(event.event_type(), event.to_payload(), source=source, ttl_ms=ttl, **options)


def write_sqlite(db: sqlite3.Connection, event: Event, *, source: str, **options: Any) -> Envelope:
    """Record ``event`` in the outbox through ``db``, inside the caller's transaction (this does
    not commit). Options as :meth:`choreo.Publisher.publish`. Creates the table if needed."""
    if not _has_table(db):
        for statement in _SQLITE_SCHEMA:
            db.execute(statement)
    envelope = _envelope(event, source, options)
    db.execute(
        f"INSERT INTO {TABLE} (id, type, body) VALUES (?, ?, ?)", (envelope.id, envelope.type, envelope.encode())
    )
    return envelope


def _has_table(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (TABLE,)).fetchone() is not None


async def write_postgres(conn: Any, event: Event, *, source: str, **options: Any) -> Envelope:
    """Record ``event`` through an asyncpg connection, inside the caller's transaction.
    The table is created by the relay (``choreo outbox relay``) or :func:`ensure_postgres`."""
    envelope = _envelope(event, source, options)
    await conn.execute(
        f"INSERT INTO {TABLE} (id, type, body) VALUES ($1, $2, $3)", envelope.id, envelope.type, envelope.encode()
    )
    return envelope


async def ensure_postgres(conn: Any) -> None:
    """Create the outbox table if missing; safe when several relays or services start at once.
    Inside the caller's transaction it joins it, and others starting meanwhile wait for its end."""
    await ensure_pg_schema(conn, TABLE, _PG_SCHEMA)


class OutboxError(ChoreoError):
    """The outbox database cannot be used: unreachable, not a database, or without the table."""


@dataclass(frozen=True)
class OutboxRow:
    seq: int
    id: str
    type: str
    body: bytes


class Outbox(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def unsent(self, limit: int, skip: Collection[int] = ()) -> Sequence[OutboxRow]:
        """The first ``limit`` unsent rows in order, leaving out the ``skip`` seqs."""
        ...

    async def mark_sent(self, seqs: Sequence[int]) -> None: ...
    async def pending(self) -> int: ...


def _is_file(path: str) -> bool:
    return os.path.isfile(path)


class SQLiteOutbox:
    def __init__(self, path: str) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None

    async def open(self) -> None:
        """Open an existing outbox; never creates a database or the table (a mistyped path
        would otherwise relay an empty new file and report success)."""
        if not _is_file(self.path):
            raise OutboxError(f"outbox database {self.path!r} does not exist (check the path or the working directory)")
        try:
            self._db = sqlite_connect(self.path)
            has_table = _has_table(self._db)
        except sqlite3.DatabaseError as exc:
            await self.close()
            raise OutboxError(f"outbox database {self.path!r} is not a usable SQLite database: {exc}") from exc
        if not has_table:
            await self.close()
            raise OutboxError(
                f"outbox database {self.path!r} has no {TABLE} table"
                " (choreo.outbox.write_sqlite creates it with the first event written)"
            )
        # The unsent-rows index, for a table created by an older version.
        self._db.execute(_SQLITE_SCHEMA[1])

    async def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("outbox is not open")
        return self._db

    async def unsent(self, limit: int, skip: Collection[int] = ()) -> Sequence[OutboxRow]:
        marks = ",".join("?" * len(skip))
        rows = self.db.execute(
            f"SELECT seq, id, type, body FROM {TABLE} WHERE sent_at IS NULL AND seq NOT IN ({marks})"
            " ORDER BY seq LIMIT ?",
            (*skip, limit),
        ).fetchall()
        return [OutboxRow(seq, id_, type_, bytes(body)) for seq, id_, type_, body in rows]

    async def mark_sent(self, seqs: Sequence[int]) -> None:
        self.db.executemany(
            f"UPDATE {TABLE} SET sent_at = (julianday('now') - 2440587.5) * 86400.0 WHERE seq = ?", [(s,) for s in seqs]
        )

    async def pending(self) -> int:
        return int(self.db.execute(f"SELECT count(*) FROM {TABLE} WHERE sent_at IS NULL").fetchone()[0])


class PostgresOutbox:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: Any = None

    async def open(self) -> None:
        import asyncpg

        try:
            self._conn = await asyncpg.connect(self.dsn)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise OutboxError(f"cannot connect to the outbox database: {exc}") from exc
        await ensure_postgres(self._conn)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def unsent(self, limit: int, skip: Collection[int] = ()) -> Sequence[OutboxRow]:
        rows = await self._conn.fetch(
            f"SELECT seq, id, type, body FROM {TABLE} WHERE sent_at IS NULL AND NOT (seq = ANY($2::bigint[]))"
            " ORDER BY seq LIMIT $1",
            limit,
            list(skip),
        )
        return [OutboxRow(r["seq"], r["id"], r["type"], bytes(r["body"])) for r in rows]

    async def mark_sent(self, seqs: Sequence[int]) -> None:
        await self._conn.execute(f"UPDATE {TABLE} SET sent_at = now() WHERE seq = ANY($1::bigint[])", list(seqs))

    async def pending(self) -> int:
        return int(await self._conn.fetchval(f"SELECT count(*) FROM {TABLE} WHERE sent_at IS NULL"))


def open_outbox(url: str) -> Outbox:
    """``sqlite:///path/to/file.db`` or ``postgresql://...``.

    As in SQLAlchemy, ``sqlite:///shop.db`` is ``shop.db`` relative to the working directory
    and ``sqlite:////var/lib/shop.db`` (four slashes) the absolute path."""
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        if not path:
            raise ConfigError(f"outbox database {url!r}: no file path after sqlite:///")
        return SQLiteOutbox(path)
    if url.startswith(("postgres://", "postgresql://")):
        return PostgresOutbox(url)
    raise ConfigError(f"outbox database {url!r}: expected sqlite:///path or postgresql://...")


@dataclass(frozen=True)
class FailedRow:
    """An outbox row that cannot be published however often it is tried; it stays unsent."""

    seq: int
    id: str
    error: str


class Relay:
    """Publishes an outbox's unsent rows in order, each confirmed before it is marked sent.

    A row that fails for a permanent reason (not a :class:`TransportError`, or headers too large
    for a frame) is logged, recorded in :attr:`failed` and skipped from then on by this relay;
    it stays unsent in the table, so a fixed relay (or an operator) can still send it.
    """

    def __init__(self, outbox: Outbox, transport: Transport, settings: Settings, *, batch: int = 100) -> None:
        self.outbox = outbox
        self.transport = transport
        self.settings = settings
        self.batch = batch
        self.published = 0
        self.failed: dict[int, FailedRow] = {}

    def _fail(self, row: OutboxRow, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}"
        self.failed[row.seq] = FailedRow(row.seq, row.id, error)
        log.error("outbox row cannot be published; left unsent and skipped", seq=row.seq, id=row.id, error=error)

    def _message(self, row: OutboxRow) -> OutgoingMessage:
        envelope = Envelope.model_validate_json(row.body)
        message = to_message(
            envelope,
            self.settings.keyring,
            self.settings.naming.exchange,
            expiration_slack_ms=self.settings.clock_skew_ms,
        )
        message.body = row.body  # publish the stored bytes exactly, signed as they are
        message.headers.update(self.settings.keyring.sign(row.body))
        return message

    async def relay_once(self) -> int:
        """Publish one batch; returns how many rows were sent or set aside as unpublishable
        (0 when nothing is left to try). Raises :class:`TransportError` if the broker did not
        confirm (the same rows are tried again next time)."""
        rows = await self.outbox.unsent(self.batch, self.failed.keys())
        if not rows:
            return 0
        batch: list[tuple[OutboxRow, OutgoingMessage]] = []
        for row in rows:
            try:
                batch.append((row, self._message(row)))
            except Exception as exc:  # a body no relay can send: retrying cannot help
                self._fail(row, exc)
        try:
            # One channel publishes in call order, so the batch keeps the outbox order.
            await self.transport.publish_many([message for _, message in batch])
            sent = [row.seq for row, _ in batch]
        except HeadersNotSendable:
            sent = await self._one_by_one(batch)
        except TransportError:
            raise
        except Exception:  # e.g. the transport could not encode one of them: find which
            sent = await self._one_by_one(batch)
        if sent:
            await self.outbox.mark_sent(sent)
        self.published += len(sent)
        return len(rows)

    async def _one_by_one(self, batch: list[tuple[OutboxRow, OutgoingMessage]]) -> list[int]:
        """Publish ``batch`` in order one at a time, setting aside the rows that fail for good.
        Before a transport error is raised, what was confirmed so far is marked sent."""
        sent: list[int] = []
        for row, message in batch:
            try:
                await self.transport.publish(message)
            except HeadersNotSendable as exc:
                self._fail(row, exc)
                continue
            except TransportError:
                if sent:
                    await self.outbox.mark_sent(sent)
                    self.published += len(sent)
                raise
            except Exception as exc:
                self._fail(row, exc)
                continue
            sent.append(row.seq)
        return sent

    async def run(self, stop: asyncio.Event, *, idle_s: float = 0.5) -> None:
        """Relay until ``stop``; rides out broker outages by retrying the same rows."""
        backoff = 0.5
        while not stop.is_set():
            try:
                sent = await self.relay_once()
                backoff = 0.5
            except TransportError as exc:
                log.warning("outbox publish not confirmed; retrying", error=str(exc), retry_in_s=backoff)
                sent = 0
                await _wait(stop, backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            if not sent:
                await _wait(stop, idle_s)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
