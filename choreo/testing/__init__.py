"""Helpers for testing agents: call handlers without a broker, wait on conditions.

emitted = await choreo.testing.call(agent, OrderPlaced(...), state=db)
assert emitted == [InventoryReserved(...)]
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from ..agent import Agent, Context, emitted_events
from ..envelope import Envelope
from ..errors import ConfigError
from ..events import Event
from ..ids import new_trace_id, uuid7

__all__ = ["call", "make_context", "wait_for"]

S = TypeVar("S")


def make_context(
    event: Event,
    *,
    agent: str = "test-agent",
    state: S = None,  # type: ignore[assignment]
    event_id: str | None = None,
    trace_id: str | None = None,
    source: str = "test",
) -> Context[S]:
    """A context as the runtime would build it for ``event`` (a fresh envelope around it)."""
    envelope = Envelope(
        id=event_id or uuid7(),
        type=event.event_type(),
        source=source,
        issued_at=datetime.now(UTC),
        trace_id=trace_id or new_trace_id(),
        payload=event.to_payload(),
    )
    return Context(agent, envelope, state)


async def call(agent: Agent[S], event: Event, *, state: S = None, event_id: str | None = None) -> list[Event]:  # type: ignore[assignment]
    """Run ``agent``'s handler for ``event`` and return what it emitted, as a list."""
    spec = agent.handler_for(event.event_type())
    if spec is None:
        raise ConfigError(f"agent {agent.name!r} does not handle {event.event_type()!r}")
    result = await spec.fn(event, make_context(event, agent=agent.name, state=state, event_id=event_id))
    return emitted_events(result)


async def wait_for(predicate: Callable[[], Any], within: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` every 10 ms until it is truthy; raise TimeoutError after ``within`` s.

    ``predicate`` may return an awaitable (e.g. ``lambda: worker.is_ready()``), which is awaited.
    Polling (not an Event) because the predicate is arbitrary state, e.g. a queue depth.
    """

    async def check() -> bool:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        return bool(result)

    try:
        async with asyncio.timeout(within):
            while not await check():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise TimeoutError(f"timed out after {within}s waiting for {what}") from None
