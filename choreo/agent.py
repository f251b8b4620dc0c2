"""Agents: a name, handlers per event class, and optional per-run state.

    agent = choreo.Agent("inventory", state=InventoryDB.open)

    @agent.on(OrderPlaced)
    async def reserve(event: OrderPlaced, ctx: choreo.Context[InventoryDB]) -> InventoryReserved:
        ...

A handler **returns** the events it emits (one, a sequence, or None), so it can be called in a
plain unit test; the runtime gives them ids, causation and trace, and publishes them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from .envelope import Envelope
from .errors import ConfigError, FaultReason
from .events import Event, EventRegistry
from .retry import DEFAULT_RETRY, RetryPolicy

__all__ = ["DEFAULT_RETRY_TIERS_S", "Agent", "AgentEnv", "Context", "Emitted", "Failure", "HandlerSpec"]

# Broker-delayed retry tiers: each is a queue whose messages wait this long, then return.
DEFAULT_RETRY_TIERS_S: tuple[float, ...] = (1.0, 10.0, 60.0)

S = TypeVar("S")
Emitted = Event | Sequence[Event] | None
HandlerFn = Callable[[Any, "Context[Any]"], Awaitable[Emitted]]
H = TypeVar("H", bound=HandlerFn)


def emitted_events(result: object) -> list[Event]:
    """A handler's return value as a list of events; TypeError for anything else."""
    if result is None:
        return []
    if isinstance(result, Event):
        return [result]
    if not isinstance(result, Sequence) or isinstance(result, (str, bytes)):
        raise TypeError(f"handler must return an Event, a sequence of Events or None, got {type(result).__name__}")
    for item in result:
        if not isinstance(item, Event):
            raise TypeError(f"handler returned {type(item).__name__}, not an Event")
    return list(result)


@dataclass(frozen=True, slots=True)
class AgentEnv:
    """What a state factory gets at start: the agent's name and a directory it may write."""

    agent: str
    state_dir: Path


@dataclass(slots=True)
class Context(Generic[S]):
    """Per-message context handed to handlers."""

    agent: str
    envelope: Envelope
    state: S
    attempt: int = 1
    transaction: object | None = None
    """The open database transaction of a transactional dedup store (see ``connection_of``)."""
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def event_id(self) -> str:
        return self.envelope.id

    @property
    def trace_id(self) -> str:
        return self.envelope.trace_id


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a handler gave up on an event, handed to its ``on_failure`` function.

    The failure event it returns is published like an emitted event: ``causation_id`` is the
    failed event's id and ``trace_id`` / ``correlation_id`` carry on, so the causation chain
    stays intact for the agents that compensate.
    """

    reason: FaultReason  # "handler_error" (permanent) or "retries_exhausted"
    error: str
    attempts: int
    envelope: Envelope


FailureFn = Callable[[Any, Failure], Event | None]


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    event_cls: type[Event]
    fn: HandlerFn
    retry: RetryPolicy | None = None
    on_failure: FailureFn | None = None

    @property
    def name(self) -> str:
        return getattr(self.fn, "__qualname__", repr(self.fn))


class Agent(Generic[S]):
    """A named set of handlers. Its queue is named after it; it binds the types it handles.

    ``state`` builds the agent's state object once per run (for example a SQLite database in
    ``env.state_dir``); if the object has a ``close()`` method it is called at shutdown.
    """

    def __init__(
        self,
        name: str,
        *,
        state: Callable[[AgentEnv], S] | None = None,
        version: str = "0",
        retry: RetryPolicy = DEFAULT_RETRY,
        retry_tiers_s: tuple[float, ...] = DEFAULT_RETRY_TIERS_S,
        transactional: bool = False,
    ) -> None:
        if not name or any(c in name for c in " #*") or name.endswith(".dlq"):
            raise ConfigError(f"agent name {name!r} must be a plain queue name")
        self.name = name
        self.version = version
        self.state_factory = state
        self.retry = retry
        if any(t <= 0 for t in retry_tiers_s) or list(retry_tiers_s) != sorted(set(retry_tiers_s)):
            raise ConfigError(f"retry_tiers_s of {name!r} must be positive and increasing, got {retry_tiers_s}")
        self.retry_tiers_s = retry_tiers_s
        # Its handlers write through ctx.transaction: the worker refuses to start without one.
        self.transactional = transactional
        self._handlers: dict[str, HandlerSpec] = {}
        self._events = EventRegistry()

    def on(
        self,
        *event_classes: type[Event],
        retry: RetryPolicy | None = None,
        on_failure: FailureFn | None = None,
    ) -> Callable[[H], H]:
        """Register the decorated coroutine as the handler of each of ``event_classes``.

        ``retry`` overrides the agent's policy. ``on_failure(event, failure)`` returns the
        event to publish when the handler fails for good (permanently, or once retries are
        exhausted), so upstream agents can compensate; without it the message is dead-lettered.
        """
        if not event_classes:
            raise ConfigError("agent.on() needs at least one event class")

        def register(fn: H) -> H:
            for cls in event_classes:
                name = cls.event_type()
                if name in self._handlers:
                    raise ConfigError(f"agent {self.name!r} already handles {name!r} with {self._handlers[name].name}")
                self._events.add(cls)
                self._handlers[name] = HandlerSpec(cls, fn, retry, on_failure)
            return fn

        return register

    @property
    def handled_types(self) -> list[str]:
        return sorted(self._handlers)

    @property
    def retry_tiers_ms(self) -> tuple[int, ...]:
        return tuple(round(t * 1000) for t in self.retry_tiers_s)

    def handler_for(self, event_type: str) -> HandlerSpec | None:
        return self._handlers.get(event_type)

    def policy_for(self, spec: HandlerSpec) -> RetryPolicy:
        return spec.retry or self.retry

    @property
    def worst_case_hold_s(self) -> float:
        """Longest any handler of this agent may hold a delivery unacked (for leases)."""
        return max((self.policy_for(s).worst_case_hold_s() for s in self._handlers.values()), default=0.0)

    def __repr__(self) -> str:
        return f"Agent({self.name!r}, handles={self.handled_types})"
