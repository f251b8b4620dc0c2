"""SQLite state for the example agents.

Handlers follow one rule that makes them safe under redelivery: a decision about an order is
recorded together with the id of the event that caused it (``decided_by``). Re-running the
same event finds its own decision and returns the same events again (same deterministic ids,
so downstream dedup absorbs them); any other event finds the decision taken and emits nothing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Self

from choreo import AgentEnv
from choreo.stores.sqlite import connect


class AgentDB:
    """An agent's SQLite file. Its tables are keyed by ``order_id`` and declared ``WITHOUT
    ROWID``: the row lives in the key's B-tree, so a decision's commit writes one page instead
    of two (the table's and its key index's), about a fifth less time per commit."""

    schema: str = ""

    def __init__(self, path: Path) -> None:
        self.db = connect(path)
        self.db.executescript(self.schema)

    @classmethod
    def for_agent(cls, env: AgentEnv) -> Self:
        """The agent's database file in its state directory (the ``state=`` factory)."""
        return cls(env.state_dir / f"{env.agent}.sqlite3")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; replicas sharing the file serialise on it."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def decide_once(self, table: str, order_id: str, event_id: str, row: Mapping[str, object]) -> bool:
        """Record the decision ``row`` about ``order_id``, taken by ``event_id``, unless one exists.

        True when this event's decision stands (just recorded, or recorded by this same event on
        an earlier run: emit again); False when another event already decided (emit nothing).
        """
        with self.transaction() as db:
            found = db.execute(f"SELECT decided_by FROM {table} WHERE order_id = ?", (order_id,)).fetchone()
            if found is not None:
                return bool(found[0] == event_id)
            columns = ["order_id", *row, "decided_by"]
            db.execute(
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                (order_id, *row.values(), event_id),
            )
        return True

    def close(self) -> None:
        self.db.close()
