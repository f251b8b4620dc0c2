"""SQLite state for the example agents.

Handlers follow one rule that makes them safe under redelivery: a decision about an order is
recorded together with the id of the event that caused it (``decided_by``). Re-running the
same event finds its own decision and returns the same events again (same deterministic ids,
so downstream dedup absorbs them); any other event finds the decision taken and emits nothing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Self

from choreo import AgentEnv
from choreo.stores.sqlite import connect


class AgentDB:
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

    def close(self) -> None:
        self.db.close()
