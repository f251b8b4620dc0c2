"""Dead-letter operations: inspect, replay, purge and export an agent's DLQ.

Safety rules, for a tool an operator runs at 3 a.m. while workers keep running:

- Every operation works on a **snapshot**: the messages in the DLQ when it starts. Messages
  that arrive meanwhile (including replayed ones failing again) are left for the next run, so
  nothing loops.
- Reading fetches the snapshot unacked and then returns it, order kept. A DLQ message is only
  ever removed (acked) after its copy is confirmed elsewhere (replay), or on purpose (purge).
- Replay publishes to **the agent's own queue** through the default exchange (other agents
  never see it again), body and signature headers untouched, and waits for the broker's
  confirm before acking the DLQ copy: a crash never loses one, and a duplicate (a crash between
  confirm and ack) is absorbed by the agent's dedup store.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from . import codec
from .errors import ChoreoError, MalformedMessage
from .runtime import AGENT, ATTEMPTS, DELAYED, ERROR, FAILED_AT, ORIGINAL_RK, REASON
from .topology import AgentQueues
from .transport.base import Delivery, HeaderValue, OutgoingMessage, Transport

__all__ = [
    "DeadLetter",
    "DlqFilter",
    "PurgeIncompleteError",
    "ReplayResult",
    "export",
    "peek",
    "purge",
    "replay",
    "summarize",
]

REPLAYED = "x-choreo-replayed"
# Fault headers describe the last failure; a replayed message starts a fresh one.
_FAULT_ONLY = (REASON, ERROR, FAILED_AT, DELAYED, AGENT)


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


@dataclass(frozen=True)
class DeadLetter:
    """One dead-lettered message as read from a DLQ."""

    body: bytes
    headers: Mapping[str, object]
    message_id: str | None = None
    correlation_id: str | None = None

    @property
    def reason(self) -> str:
        reason = _text(self.headers.get(REASON))
        if reason:
            return reason
        # Dead-lettered by the broker itself (delivery limit, expiration): read x-death.
        deaths = self.headers.get("x-death")
        if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
            return f"broker:{_text(deaths[0].get('reason'))}"
        return "unknown"

    @property
    def error(self) -> str:
        return _text(self.headers.get(ERROR)) or ""

    @property
    def attempts(self) -> int:
        try:
            return int(_text(self.headers.get(ATTEMPTS)) or 0)
        except ValueError:
            return 0

    @property
    def failed_at(self) -> datetime | None:
        text = _text(self.headers.get(FAILED_AT))
        if not text:
            return None
        try:
            return datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            return None

    @property
    def envelope(self) -> dict[str, Any] | None:
        """The decoded body if it is a JSON object (bad bodies are shown raw)."""
        try:
            return codec.loads_object(self.body)
        except MalformedMessage:
            return None

    @property
    def event_type(self) -> str:
        envelope = self.envelope
        if envelope is not None and isinstance(envelope.get("type"), str):
            return str(envelope["type"])
        return _text(self.headers.get(ORIGINAL_RK)) or "?"

    @property
    def event_id(self) -> str | None:
        envelope = self.envelope
        if envelope is not None and isinstance(envelope.get("id"), str):
            return str(envelope["id"])
        return self.message_id

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe record (for ``export``): the exact body in base64, and as text if UTF-8."""
        try:
            text: str | None = self.body.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        return {
            "event_id": self.event_id,
            "event_type": self.event_type,
            "reason": self.reason,
            "error": self.error,
            "attempts": self.attempts,
            "failed_at": _text(self.headers.get(FAILED_AT)),
            "headers": {k: _json_safe(v) for k, v in self.headers.items()},
            "message_id": self.message_id,
            "correlation_id": self.correlation_id,
            "body_base64": base64.b64encode(self.body).decode("ascii"),
            "body": text,
        }


def _json_safe(value: object) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _dead_letter(delivery: Delivery) -> DeadLetter:
    return DeadLetter(delivery.body, dict(delivery.headers), delivery.message_id, delivery.correlation_id)


class _Snapshot:
    """Deliveries fetched unacked, and which of them the caller acked. Settling a delivery tag
    twice is a channel error (PRECONDITION_FAILED "unknown delivery tag"): the broker closes the
    channel and the settles still on their way to a quorum queue are dropped, so the acked
    messages come back. Only what was not acked is returned on exit."""

    def __init__(self) -> None:
        self.held: list[Delivery] = []
        self._acked: set[int] = set()

    async def ack(self, delivery: Delivery) -> None:
        self._acked.add(id(delivery))  # marked first: a settle that failed half-way is not retried
        await delivery.ack()

    def unacked(self) -> list[Delivery]:
        return [d for d in self.held if id(d) not in self._acked]


@contextlib.asynccontextmanager
async def _snapshot(
    transport: Transport,
    queue: str,
    limit: int | None = None,
    on_fetch: Callable[[int, int], None] | None = None,
) -> AsyncIterator[_Snapshot]:
    """The queue's current messages, fetched unacked; whatever the caller leaves unacked is
    returned to the queue, in order, on exit. ``on_fetch(fetched, total)`` is called as
    messages arrive, for progress displays."""
    depth = await transport.queue_depth(queue)
    if limit is not None:
        depth = min(depth, limit)
    snapshot = _Snapshot()
    held = snapshot.held
    try:
        while len(held) < depth:
            delivery = await transport.get(queue)
            if delivery is None:
                break
            held.append(delivery)
            if on_fetch:
                on_fetch(len(held), depth)
        yield snapshot
    finally:
        for delivery in snapshot.unacked():
            try:
                await delivery.nack(requeue=True)
            except ChoreoError:
                break  # the channel is gone: the broker returns every unsettled one itself


@dataclass(frozen=True)
class DlqFilter:
    reason: str | None = None
    event_type: str | None = None
    since: datetime | None = None

    def matches(self, dead: DeadLetter) -> bool:
        if self.reason is not None and dead.reason != self.reason:
            return False
        if self.event_type is not None and dead.event_type != self.event_type:
            return False
        if self.since is not None:
            failed = dead.failed_at
            if failed is None or failed < self.since:
                return False
        return True


async def peek(transport: Transport, queue: str, *, limit: int | None = None) -> list[DeadLetter]:
    """The first ``limit`` messages of ``queue``, left where they are."""
    async with _snapshot(transport, queue, limit) as snapshot:
        return [_dead_letter(d) for d in snapshot.held]


@dataclass
class Summary:
    queue: str
    total: int = 0
    by_reason: collections.Counter[str] = field(default_factory=collections.Counter)
    by_type: collections.Counter[str] = field(default_factory=collections.Counter)
    by_error: collections.Counter[str] = field(default_factory=collections.Counter)
    oldest: datetime | None = None
    newest: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "total": self.total,
            "by_reason": dict(self.by_reason),
            "by_type": dict(self.by_type),
            "by_error": dict(self.by_error.most_common(10)),
            "oldest": self.oldest.isoformat() if self.oldest else None,
            "newest": self.newest.isoformat() if self.newest else None,
        }


async def summarize(transport: Transport, queue: str) -> Summary:
    summary = Summary(queue)
    for dead in await peek(transport, queue):
        summary.total += 1
        summary.by_reason[dead.reason] += 1
        summary.by_type[dead.event_type] += 1
        summary.by_error[dead.error[:80]] += 1
        if dead.failed_at is not None:
            summary.oldest = min(summary.oldest or dead.failed_at, dead.failed_at)
            summary.newest = max(summary.newest or dead.failed_at, dead.failed_at)
    return summary


@dataclass
class ReplayResult:
    scanned: int = 0
    matched: int = 0
    replayed: int = 0
    dry_run: bool = False
    fetched: int = 0  # of the snapshot, fetched so far (the first phase)
    total: int = 0  # the snapshot's size: what ``fetched`` and then ``scanned`` count up to


async def replay(
    transport: Transport,
    queues: AgentQueues,
    *,
    where: DlqFilter | None = None,
    limit: int | None = None,
    rate: float | None = None,
    dry_run: bool = False,
    on_progress: Callable[[ReplayResult], None] | None = None,
) -> ReplayResult:
    """Move matching DLQ messages back to the agent's own queue; see the module's safety rules.

    ``limit`` bounds how many are replayed, ``rate`` how many per second. With ``dry_run``
    nothing moves: the result says what would. ``on_progress`` is called as each message is
    fetched (``fetched`` of ``total``) and then as each is scanned (``scanned`` of ``total``).
    """
    where = where or DlqFilter()
    result = ReplayResult(dry_run=dry_run)

    def fetched(count: int, total: int) -> None:
        result.fetched, result.total = count, total
        if on_progress:
            on_progress(result)

    async with _snapshot(transport, queues.dlq, on_fetch=fetched) as snapshot:
        result.fetched = result.total = len(snapshot.held)
        for delivery in snapshot.held:
            result.scanned += 1
            dead = _dead_letter(delivery)
            if where.matches(dead) and (limit is None or result.matched < limit):
                result.matched += 1
                if not dry_run:
                    await transport.publish(_replay_message(dead, queues.main))  # confirmed first
                    await snapshot.ack(delivery)
                    result.replayed += 1
                    if rate:
                        await asyncio.sleep(1 / rate)
            if on_progress:
                on_progress(result)
    return result


def _replay_message(dead: DeadLetter, queue: str) -> OutgoingMessage:
    headers: dict[str, HeaderValue] = {
        k: v  # type: ignore[misc]
        for k, v in dead.headers.items()
        if k not in _FAULT_ONLY and k not in ("x-death", "x-delivery-count")
    }
    try:
        replayed = int(_text(dead.headers.get(REPLAYED)) or 0)
    except ValueError:
        replayed = 0
    headers[REPLAYED] = replayed + 1
    return OutgoingMessage(
        exchange="",
        routing_key=queue,
        body=dead.body,
        headers=headers,
        message_id=dead.message_id,
        correlation_id=dead.correlation_id,
        mandatory=True,  # the agent's queue must exist: never into the void
    )


class PurgeIncompleteError(ChoreoError):
    """A purge acked messages that the queue still holds afterwards (the broker dropped the
    settles, e.g. because the channel closed): nothing may be reported as deleted."""


async def purge(
    transport: Transport, queue: str, *, where: DlqFilter | None = None, verify_within_s: float = 5.0
) -> int:
    """Drop the matching messages of the current snapshot; returns how many.

    Then checks the queue's depth: it must come down to at most what was not dropped. Raises
    :class:`PurgeIncompleteError` if it does not within ``verify_within_s`` (messages arriving in the
    DLQ meanwhile also count, so on a busy DLQ this can be a false alarm; running again is safe).
    """
    where = where or DlqFilter()
    dropped = 0
    async with _snapshot(transport, queue) as snapshot:
        for delivery in snapshot.held:
            if where.matches(_dead_letter(delivery)):
                await snapshot.ack(delivery)
                dropped += 1
                if dropped % _SETTLE_WINDOW == 0:
                    await _pause_for_settles(transport, queue)
        kept = len(snapshot.held) - dropped
    expected = await _settled_depth(transport, queue, kept, verify_within_s)
    if expected > kept:
        raise PurgeIncompleteError(
            f"{queue}: acked {dropped} for deletion, but {expected - kept} of them are still in the queue"
            f" ({expected} left, expected {kept}; new dead letters arriving meanwhile count too): run the purge again"
        )
    return dropped


# A quorum queue's client in the broker's channel keeps at most ~32 settles in flight and holds
# the rest back until earlier ones are applied; those held back are dropped if the channel
# closes first, and their messages return. Acks therefore go out in windows below that limit,
# each followed by a broker round trip that gives the earlier ones time to be applied.
_SETTLE_WINDOW = 25


async def _pause_for_settles(transport: Transport, queue: str) -> None:
    await transport.queue_depth(queue)


async def _settled_depth(transport: Transport, queue: str, at_most: int, within_s: float) -> int:
    """The queue's depth once it is at most ``at_most``, or its depth after ``within_s``
    (settles reach a quorum queue asynchronously, so the first reading can be stale)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while True:
        depth = await transport.queue_depth(queue)
        if depth <= at_most or loop.time() >= deadline:
            return depth
        await asyncio.sleep(0.1)


async def export(transport: Transport, queue: str, write: Callable[[str], object]) -> int:
    """Write each message of ``queue`` as one JSON line via ``write``; messages stay in place."""
    count = 0
    for dead in await peek(transport, queue):
        write(codec.dumps(dead.to_json()).decode() + "\n")
        count += 1
    return count
