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

__all__ = ["DeadLetter", "DlqFilter", "ReplayResult", "export", "peek", "purge", "replay", "summarize"]

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


@contextlib.asynccontextmanager
async def _snapshot(transport: Transport, queue: str, limit: int | None = None) -> AsyncIterator[list[Delivery]]:
    """The queue's current messages, fetched unacked; whatever the caller leaves unsettled is
    returned to the queue, in order, on exit."""
    depth = await transport.queue_depth(queue)
    if limit is not None:
        depth = min(depth, limit)
    held: list[Delivery] = []
    try:
        while len(held) < depth:
            delivery = await transport.get(queue)
            if delivery is None:
                break
            held.append(delivery)
        yield held
    finally:
        for delivery in held:
            with contextlib.suppress(ChoreoError):
                await delivery.nack(requeue=True)  # no-op error if already settled


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
    async with _snapshot(transport, queue, limit) as held:
        return [_dead_letter(d) for d in held]


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
    nothing moves: the result says what would.
    """
    where = where or DlqFilter()
    result = ReplayResult(dry_run=dry_run)
    async with _snapshot(transport, queues.dlq) as held:
        for delivery in held:
            result.scanned += 1
            dead = _dead_letter(delivery)
            if not where.matches(dead) or (limit is not None and result.matched >= limit):
                continue
            result.matched += 1
            if not dry_run:
                await transport.publish(_replay_message(dead, queues.main))  # confirmed first
                await delivery.ack()
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


async def purge(transport: Transport, queue: str, *, where: DlqFilter | None = None) -> int:
    """Drop the matching messages of the current snapshot; returns how many."""
    where = where or DlqFilter()
    dropped = 0
    async with _snapshot(transport, queue) as held:
        for delivery in held:
            if where.matches(_dead_letter(delivery)):
                await delivery.ack()
                dropped += 1
    return dropped


async def export(transport: Transport, queue: str, write: Callable[[str], object]) -> int:
    """Write each message of ``queue`` as one JSON line via ``write``; messages stay in place."""
    count = 0
    for dead in await peek(transport, queue):
        write(codec.dumps(dead.to_json()).decode() + "\n")
        count += 1
    return count
