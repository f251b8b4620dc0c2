"""The per-agent message pipeline.

For each delivery, in this order:

1. size limit, then **signature over the exact body bytes** (before any parsing);
2. decode the envelope, check staleness (``ttl_ms`` + clock-skew tolerance), find the
   handler, validate the payload: any failure dead-letters with its reason, body intact;
3. claim the dedup key: a key already done is acked as a duplicate without running the handler;
4. run the handler; build the emitted envelopes with deterministic ids, causation and trace;
5. publish them and wait for the broker's confirms;
6. mark the dedup key done, then ack.

A crash anywhere before 6 leaves the message unacked, so the broker redelivers it; a crash
between the dedup mark and the ack makes the redelivery a suppressed duplicate. The worker
never crashes on a message: every outcome ends in ack, dead-letter-then-ack, or nack.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

from .agent import Agent, AgentEnv, Context, HandlerSpec
from .config import Settings
from .envelope import Envelope, format_timestamp, parse_envelope
from .errors import EventExpired, MalformedMessage, MessageFault, TransportError, UnknownEventType
from .events import Event
from .ids import derived_id
from .log import get_logger
from .publisher import to_message
from .stores.base import DedupStore
from .stores.sqlite import SQLiteDedupStore
from .topology import Topology, agent_topology
from .transport.base import Delivery, HeaderValue, OutgoingMessage, Subscription, Transport

__all__ = ["AgentRuntime", "AgentStats"]

S = TypeVar("S")
log = get_logger("choreo.runtime")

REASON = "x-choreo-reason"
ERROR = "x-choreo-error"
AGENT = "x-choreo-agent"
ATTEMPTS = "x-choreo-attempts"
FAILED_AT = "x-choreo-failed-at"
ORIGINAL_RK = "x-choreo-original-routing-key"
_MAX_ERROR_CHARS = 500


@dataclass
class AgentStats:
    received: int = 0
    handled: int = 0
    duplicates: int = 0
    emitted: int = 0
    requeued: int = 0
    dead_lettered: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def dead_lettered_total(self) -> int:
        return sum(self.dead_lettered.values())


def _int_header(value: object) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, (str, bytes)):
        try:
            return int(value)
        except ValueError:
            return 0
    return 0


class AgentRuntime(Generic[S]):
    """Runs one agent on a transport: declares its topology, consumes, handles, settles."""

    def __init__(
        self,
        agent: Agent[S],
        transport: Transport,
        settings: Settings,
        *,
        dedup: DedupStore | None = None,
        lease_s: float = 30.0,
    ) -> None:
        self.agent = agent
        self.transport = transport
        self.settings = settings
        self.queues = settings.naming.agent_queues(agent.name)
        self.dedup: DedupStore = dedup or SQLiteDedupStore(settings.state_dir / f"{agent.name}.dedup.sqlite3")
        self.lease_s = lease_s
        self.stats = AgentStats()
        self.state: S | None = None
        self._sub: Subscription | None = None
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._local_claims: dict[str, asyncio.Future[None]] = {}
        self._skew = timedelta(milliseconds=settings.clock_skew_ms)

    @property
    def topology(self) -> Topology:
        return agent_topology(
            self.agent.name,
            self.agent.handled_types,
            naming=self.settings.naming,
            delivery_limit=self.settings.delivery_limit,
        )

    async def is_attached(self) -> bool:
        return self._sub is not None and await self._sub.is_attached()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def start(self) -> None:
        """Open state and dedup store, declare topology, then start consuming."""
        if self.agent.state_factory is not None:
            self.settings.state_dir.mkdir(parents=True, exist_ok=True)
            self.state = self.agent.state_factory(AgentEnv(self.agent.name, self.settings.state_dir))
        await self.dedup.open()
        await self.transport.declare(self.topology)
        self._sub = await self.transport.subscribe(self.queues.main, self._on_delivery, prefetch=self.settings.prefetch)
        log.info("agent started", agent=self.agent.name, queue=self.queues.main, handles=self.agent.handled_types)

    async def stop(self, grace_s: float | None = None) -> bool:
        """Stop consuming, wait for in-flight handlers (up to ``grace_s``), close stores.

        Returns False if handlers were still running at the deadline (their messages stay
        unacked and the broker redelivers them).
        """
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        if self._sub is not None:
            await self._sub.cancel()
        finished = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=grace)
        except TimeoutError:
            finished = False
            log.warning("shutdown grace period over", agent=self.agent.name, in_flight=self._in_flight)
        await self.dedup.close()
        close = getattr(self.state, "close", None)
        if callable(close):
            result = close()
            if asyncio.iscoroutine(result):
                await result
        log.info("agent stopped", agent=self.agent.name, **self._stats_fields())
        return finished

    def _stats_fields(self) -> dict[str, Any]:
        s = self.stats
        return {
            "received": s.received,
            "handled": s.handled,
            "duplicates": s.duplicates,
            "dead_lettered": s.dead_lettered_total,
        }

    # pipeline ---------------------------------------------------------------------------------
    async def _on_delivery(self, delivery: Delivery) -> None:
        self._in_flight += 1
        self._idle.clear()
        try:
            await self._process(delivery)
        except Exception:  # the pipeline settles every outcome; this is the last guard
            log.exception("unexpected error in pipeline; message left for redelivery", agent=self.agent.name)
            await self._settle(delivery, requeue=True)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    def _decode(self, delivery: Delivery) -> tuple[Envelope, HandlerSpec, Event]:
        body = delivery.body
        if len(body) > self.settings.max_body_bytes:
            raise MalformedMessage(f"body of {len(body)} bytes exceeds the limit of {self.settings.max_body_bytes}")
        self.settings.keyring.verify(body, delivery.headers)
        envelope = parse_envelope(body)
        if envelope.ttl_ms is not None:
            deadline = envelope.issued_at + timedelta(milliseconds=envelope.ttl_ms) + self._skew
            if datetime.now(UTC) > deadline:
                raise EventExpired(f"issued {format_timestamp(envelope.issued_at)} with ttl_ms={envelope.ttl_ms}")
        spec = self.agent.handler_for(envelope.type)
        if spec is None:
            raise UnknownEventType(f"agent {self.agent.name!r} has no handler for {envelope.type!r}")
        event = spec.event_cls.from_payload(envelope.payload)
        return envelope, spec, event

    async def _process(self, delivery: Delivery) -> None:
        self.stats.received += 1
        try:
            envelope, spec, event = self._decode(delivery)
        except MessageFault as fault:
            await self._dead_letter(delivery, fault.reason, str(fault))
            return

        key = envelope.effective_dedup_key
        if not await self._claim(key):
            self.stats.duplicates += 1
            await self._settle(delivery)
            return
        local = asyncio.get_running_loop().create_future()
        self._local_claims[key] = local
        try:
            await self._handle(delivery, envelope, spec, event, key)
        finally:
            del self._local_claims[key]
            local.set_result(None)

    async def _claim(self, key: str) -> bool:
        """True when this delivery holds the claim; False when the key is already done."""
        backoff = 0.05
        while True:
            local = self._local_claims.get(key)
            if local is not None:  # the same key is being handled in this process: wait for it
                await local
                continue
            result = await self.dedup.claim(self.agent.name, key, lease_s=self.lease_s)
            if result == "claimed":
                return True
            if result == "done":
                return False
            # Held by another replica (or a crashed one whose lease runs out): keep the message
            # unacked and look again, rather than requeueing into a hot loop.
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def _handle(self, delivery: Delivery, envelope: Envelope, spec: HandlerSpec, event: Event, key: str) -> None:
        attempts = self._attempts(delivery)
        ctx: Context[Any] = Context(self.agent.name, envelope, self.state, attempt=attempts)
        try:
            result = await spec.fn(event, ctx)
            messages = self._emitted_messages(envelope, result)
        except Exception as exc:
            await self.dedup.release(self.agent.name, key)
            log.warning(
                "handler failed",
                agent=self.agent.name,
                event_type=envelope.type,
                event_id=envelope.id,
                trace_id=envelope.trace_id,
                error=repr(exc),
            )
            await self._dead_letter(delivery, "handler_error", f"{type(exc).__name__}: {exc}")
            return
        if messages:
            try:
                await self.transport.publish_many(messages)
            except TransportError as exc:
                # Not confirmed: nothing is marked done, the message returns to the queue and the
                # re-run re-emits the same ids, which downstream dedup absorbs.
                await self.dedup.release(self.agent.name, key)
                log.warning("emitted events not confirmed; requeueing", agent=self.agent.name, error=repr(exc))
                await self._settle(delivery, requeue=True)
                return
        await self.dedup.complete(self.agent.name, key)
        self.stats.handled += 1
        self.stats.emitted += len(messages)
        await self._settle(delivery)

    def _emitted_messages(self, parent: Envelope, result: object) -> list[OutgoingMessage]:
        if result is None:
            return []
        events: Sequence[object] = [result] if isinstance(result, Event) else result  # type: ignore[assignment]
        if not isinstance(events, Sequence) or isinstance(events, (str, bytes)):
            raise TypeError(f"handler must return an Event, a sequence of Events or None, got {type(result).__name__}")
        now = datetime.now(UTC)
        ordinals: collections.Counter[str] = collections.Counter()
        messages = []
        for item in events:
            if not isinstance(item, Event):
                raise TypeError(f"handler returned {type(item).__name__}, not an Event")
            event_type = item.event_type()
            ordinal = ordinals[event_type]
            ordinals[event_type] += 1
            envelope = Envelope.model_construct(
                id=derived_id(parent.id, self.agent.name, event_type, ordinal),
                type=event_type,
                source=self.agent.name,
                issued_at=now,
                trace_id=parent.trace_id,
                causation_id=parent.id,
                correlation_id=parent.effective_correlation_id,
                dedup_key=None,
                ttl_ms=type(item).__event_ttl_ms__,
                payload=item.model_dump(mode="json"),
            )
            messages.append(to_message(envelope, self.settings.keyring, self.settings.naming.exchange))
        return messages

    def _attempts(self, delivery: Delivery) -> int:
        headers = delivery.headers
        # x-delivery-count is set by quorum queues on redeliveries.
        return _int_header(headers.get(ATTEMPTS)) + _int_header(headers.get("x-delivery-count")) + 1

    async def _dead_letter(self, delivery: Delivery, reason: str, error: str) -> None:
        """Publish to the agent's DLQ (confirmed), then ack the original. Body and signature
        headers are kept unchanged so a replay is still verifiable."""
        headers: dict[str, HeaderValue] = dict(delivery.headers)  # type: ignore[arg-type]
        original_rk = headers.get(ORIGINAL_RK) or delivery.routing_key
        headers.update(
            {
                REASON: reason,
                ERROR: error[:_MAX_ERROR_CHARS],
                AGENT: self.agent.name,
                ATTEMPTS: self._attempts(delivery),
                FAILED_AT: format_timestamp(datetime.now(UTC)),
                ORIGINAL_RK: original_rk,
            }
        )
        headers.pop("x-delivery-count", None)
        message = OutgoingMessage(
            exchange="",
            routing_key=self.queues.dlq,
            body=delivery.body,
            headers=headers,
            message_id=delivery.message_id,
            mandatory=True,
        )
        try:
            await self.transport.publish(message)
        except TransportError as exc:
            log.error("dead-letter publish failed; requeueing", agent=self.agent.name, reason=reason, error=repr(exc))
            await asyncio.sleep(0.5)  # do not spin on a broker that refuses the DLQ publish
            await self._settle(delivery, requeue=True)
            return
        self.stats.dead_lettered[reason] += 1
        log.warning("dead-lettered", agent=self.agent.name, reason=reason, error=error[:200], routing_key=original_rk)
        await self._settle(delivery)

    async def _settle(self, delivery: Delivery, *, requeue: bool | None = None) -> None:
        try:
            if requeue is None:
                await delivery.ack()
            else:
                self.stats.requeued += 1
                await delivery.nack(requeue=requeue)
        except TransportError as exc:
            # The channel is gone; the broker redelivers the message and dedup absorbs a re-run.
            log.warning("settle failed", agent=self.agent.name, error=repr(exc))
