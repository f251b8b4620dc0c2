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
import contextlib
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

from . import codec
from .agent import Agent, AgentEnv, Context, Failure, HandlerSpec, emitted_events
from .config import Settings
from .envelope import Envelope, format_timestamp, now_timestamp, parse_envelope, wire_fields
from .errors import (
    ConfigError,
    EventExpired,
    FaultReason,
    HandlerError,
    HeadersNotSendable,
    MalformedMessage,
    MessageFault,
    Reject,
    TransportError,
    UnknownEventType,
)
from .events import Event
from .ids import derived_id
from .log import debug_enabled, get_logger, message_fields, reset_message_fields
from .observability import tracing as otel
from .observability.heartbeat import LatencyWindow
from .observability.metrics import AgentMetrics, Metrics
from .publisher import signed_message
from .retry import Deadlines, run_with_retries
from .signing import ALG_HEADER, KID_HEADER, SIG_HEADER
from .stores import dedup_store_for
from .stores.base import Claim, DedupStore
from .topology import Topology, agent_topology
from .transport.base import UNDECODABLE_PROPERTIES, Delivery, HeaderValue, OutgoingMessage, Subscription, Transport

__all__ = ["AgentRuntime", "AgentStats", "topology_for"]

S = TypeVar("S")
log = get_logger("choreo.runtime")

REASON = "x-choreo-reason"
ERROR = "x-choreo-error"
AGENT = "x-choreo-agent"
ATTEMPTS = "x-choreo-attempts"
FAILED_AT = "x-choreo-failed-at"
ORIGINAL_RK = "x-choreo-original-routing-key"
DELAYED = "x-choreo-delayed-retries"
DROPPED = "x-choreo-dropped-headers"
# What a move keeps when all the headers do not fit in a frame: what a replay needs to verify
# and route the message, and its trace.
_ESSENTIAL_HEADERS = frozenset({ALG_HEADER, KID_HEADER, SIG_HEADER, "traceparent", "tracestate", ORIGINAL_RK})
_MAX_ERROR_CHARS = 500
# A lost channel fails every ack it held at once: the first failure is logged at once, the
# rest of this window's in one summary line (a warning per message floods the log).
_SETTLE_REPORT_S = 1.0
_SETTLE_REPORT_IDS = 20


def _timestamp_text(at: datetime) -> str:
    try:
        return format_timestamp(at)
    except (OverflowError, ValueError):  # out of range once moved to UTC (year 1 at +01:00)
        return at.isoformat()


def _trimmed(headers: dict[str, HeaderValue], extra: dict[str, HeaderValue]) -> dict[str, HeaderValue]:
    """``headers`` cut down to the essential ones and ``extra``, naming the others in ``DROPPED``."""
    kept = {k: v for k, v in headers.items() if k in _ESSENTIAL_HEADERS or k in extra}
    dropped = sorted(k for k in headers if k not in kept)
    kept[DROPPED] = ", ".join(dropped)[:1000]
    return kept


def topology_for(agent: Agent[Any], settings: Settings) -> Topology:
    """Everything ``agent`` declares on the broker under ``settings``: exchange, its queue,
    DLQ and retry tiers."""
    return agent_topology(
        agent.name,
        agent.handled_types,
        naming=settings.naming,
        delivery_limit=settings.delivery_limit,
        retry_tiers_ms=agent.retry_tiers_ms,
    )


@dataclass
class AgentStats:
    received: int = 0
    handled: int = 0
    duplicates: int = 0
    emitted: int = 0
    requeued: int = 0
    failed: int = 0  # deliveries whose handler failed after its in-process tries
    retried_in_process: int = 0
    retried_delayed: int = 0
    compensated: int = 0  # failures answered with the handler's failure event
    settle_failed: int = 0  # acks/nacks lost with their channel: the broker redelivers those
    dead_lettered: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def dead_lettered_total(self) -> int:
        return sum(self.dead_lettered.values())


_ABANDON_WAIT_S = 1.0  # how long stop() lets cancelled handlers unwind before closing the stores
_MAX_COUNT = 2**31 - 1  # counts from headers are clamped: anyone can send any number


def _int_header(value: object) -> int:
    """A count from a header (ours or the broker's), 0 when absent or unreadable, and never
    beyond what AMQP carries back (the count + 1 goes into the fault headers)."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        number = value
    elif isinstance(value, (str, bytes)):
        try:
            number = int(value)
        except ValueError:
            return 0
    else:
        return 0
    return min(max(number, 0), _MAX_COUNT)


class AgentRuntime(Generic[S]):
    """Runs one agent on a transport: declares its topology, consumes, handles, settles."""

    def __init__(
        self,
        agent: Agent[S],
        transport: Transport,
        settings: Settings,
        *,
        dedup: DedupStore | None = None,
        lease_s: float | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.agent = agent
        self.transport = transport
        self.settings = settings
        self.queues = settings.naming.agent_queues(agent.name)
        self.dedup: DedupStore = dedup or dedup_store_for(settings, agent.name)
        # Short leases, renewed every third of a lease while a handler runs (see _renew_leases):
        # a slow handler keeps its claim, a crashed worker's claims free up within one lease.
        self.lease_s = lease_s if lease_s is not None else settings.dedup_lease_s
        self._worst_hold_s = agent.worst_case_hold_s
        hold_s = self._worst_hold_s + 30.0  # + publishing and settling
        if hold_s * 1000 >= settings.consumer_timeout_ms:
            raise ConfigError(
                f"agent {agent.name!r} may hold a message {hold_s:.0f}s, beyond RabbitMQ's consumer_timeout "
                f"({settings.consumer_timeout_ms / 1000:.0f}s): lower its retry attempts or timeout_s"
            )
        self._tiers_ms = agent.retry_tiers_ms
        self._deadlines = Deadlines()  # one timer bounds every handler run of this agent
        self.stats = AgentStats()
        self.state: S | None = None
        self._sub: Subscription | None = None
        # The tasks handling deliveries now: their count is the in-flight gauge, and stop()
        # cancels those still running when the grace period ends.
        self._handling: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        # Deliveries waiting for another delivery of the same key in this process to finish.
        self._local_claims: dict[str, list[asyncio.Future[None]]] = {}
        self._cleanup_task: asyncio.Task[None] | None = None
        self._renew_task: asyncio.Task[None] | None = None
        self._held: dict[str, Claim] = {}  # claims of handlers running now, renewed by _renew_leases
        # Acks lost with their channel since the last one logged: how many, and the first ids.
        self._unreported_settles = 0
        self._unreported_ids: list[str] = []
        self._settle_report: asyncio.TimerHandle | None = None
        self._skew = timedelta(milliseconds=settings.clock_skew_ms)
        self.metrics: AgentMetrics = (metrics or Metrics()).for_agent(agent.name, agent.handled_types)
        self.metrics.track_in_flight(lambda: len(self._handling))
        self.latency = LatencyWindow()
        self._tracing: otel.Tracing | None = None  # read at start: None means tracing is off
        self._debug = True  # read at start: whether the per-message debug lines are written

    @property
    def topology(self) -> Topology:
        return topology_for(self.agent, self.settings)

    async def is_attached(self) -> bool:
        return self._sub is not None and await self._sub.is_attached()

    @property
    def in_flight(self) -> int:
        return len(self._handling)

    async def start(self) -> None:
        """Open state and dedup store, declare topology, then start consuming."""
        self._tracing = otel.current()
        self._debug = debug_enabled(log)
        if self.agent.state_factory is not None:
            self.settings.state_dir.mkdir(parents=True, exist_ok=True)
            self.state = self.agent.state_factory(AgentEnv(self.agent.name, self.settings.state_dir))
        await self.dedup.open()
        try:
            await self._start_consuming()
        except BaseException:
            await self._close_resources()
            raise
        log.info("agent started", agent=self.agent.name, queue=self.queues.main, handles=self.agent.handled_types)

    async def _start_consuming(self) -> None:
        if self.agent.transactional and not getattr(self.dedup, "transactional", False):
            raise ConfigError(
                f"agent {self.agent.name!r} needs a transactional dedup store: "
                "CHOREO_DEDUP_URL=postgresql://... with CHOREO_DEDUP_TRANSACTIONAL=1"
            )
        self._cleanup_task = asyncio.get_running_loop().create_task(self._cleanup_loop())
        self._renew_task = asyncio.get_running_loop().create_task(self._renew_leases())
        await self.transport.declare(self.topology)
        self._sub = await self.transport.subscribe(self.queues.main, self._on_delivery, prefetch=self.settings.prefetch)

    async def stop(self, grace_s: float | None = None) -> bool:
        """Stop consuming, wait for in-flight handlers (up to ``grace_s``), close stores.

        Returns False if handlers were still running at the deadline: they are cancelled, and
        their messages, never settled, go back to the queue when the subscription closes.
        """
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        if self._sub is not None:
            await self._sub.cancel()
        finished = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=grace)
        except TimeoutError:
            finished = False
            log.warning("shutdown grace period over", agent=self.agent.name, in_flight=len(self._handling))
            await self._abandon_in_flight()
        if self._sub is not None:
            # The acks asked for go out; deliveries left unsettled go back to the queue now,
            # not when the connection closes (which may be much later if the application
            # shares it with this worker).
            with contextlib.suppress(TransportError):
                await self._sub.close()
        await self._close_resources()
        self._report_settle_failures()  # before the last line: nothing of this agent logs after it
        log.info("agent stopped", agent=self.agent.name, **self._stats_fields())
        return finished

    async def _abandon_in_flight(self) -> None:
        """Cancel the handling still running, so that none of it settles its delivery: left
        unacked, each comes back from the broker. Without this, a handler cut off from its
        store (closed next) would fail, and its failure would be handled as the message's own
        (a retry, a dead-letter, a compensation). The cancelled tasks unwind before the stores
        close, so their claims are released (transactions rolled back); a handler that
        swallows the cancel is not waited for beyond ``_ABANDON_WAIT_S``."""
        tasks = [task for task in self._handling if not task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=_ABANDON_WAIT_S)

    async def _close_resources(self) -> None:
        for task in (self._cleanup_task, self._renew_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.dedup.close()
        close = getattr(self.state, "close", None)
        if callable(close):
            result = close()
            if asyncio.iscoroutine(result):
                await result

    async def _renew_leases(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            for claim in list(self._held.values()):
                try:
                    await claim.extend(self.lease_s)
                except Exception as exc:  # the next renewal may succeed; the lease has slack
                    log.warning("lease renewal failed", agent=self.agent.name, error=repr(exc))

    async def _cleanup_loop(self, every_s: float = 3600.0) -> None:
        """Drop done dedup keys past the retention window, hourly."""
        while True:
            try:
                removed = await self.dedup.cleanup(older_than_s=self.settings.dedup_retention_s)
                if removed:
                    log.info("dedup cleanup", agent=self.agent.name, removed=removed)
            except Exception as exc:  # a store hiccup must not stop the worker
                log.warning("dedup cleanup failed", agent=self.agent.name, error=repr(exc))
            await asyncio.sleep(every_s)

    def _stats_fields(self) -> dict[str, Any]:
        s = self.stats
        return {
            "received": s.received,
            "handled": s.handled,
            "duplicates": s.duplicates,
            "dead_lettered": s.dead_lettered_total,
            "settle_failed": s.settle_failed,
        }

    # pipeline ---------------------------------------------------------------------------------
    # The common path runs in as few coroutine frames as it can: a delivery waits for a commit
    # or a flush two or three times, and each wait suspends and resumes every frame between
    # the task and the future (about 1,500 instructions per frame, measured with callgrind).
    async def _on_delivery(self, delivery: Delivery) -> None:
        """The whole pipeline for one delivery, in the task the transport runs it in; it ends
        with the delivery settled (acked, moved then acked, or nacked) in every case."""
        task = asyncio.current_task()
        assert task is not None  # the transport runs every delivery's handling in a task
        self._handling.add(task)
        self._idle.clear()
        self.stats.received += 1
        tracing = self._tracing
        start_ns = time.time_ns() if tracing is not None else 0
        metrics = self.metrics
        envelope: Envelope | None = None
        try:
            label = metrics.bounded(delivery.type)
            try:
                envelope = self._verified_envelope(delivery)
                label = metrics.bounded(envelope.type)
                spec, event = self._resolve(envelope)
            except MessageFault as fault:
                await self._reject(delivery, envelope, fault, label, start_ns)
                return
            metrics.count_received(label)
            span = self._consume_span(tracing, delivery, envelope, start_ns)
            outcome = "requeued"
            token = message_fields(self._log_fields(delivery, envelope))
            try:
                outcome = await self._claim_and_handle(delivery, envelope, spec, event)
            finally:
                reset_message_fields(token)
                if span is not None:
                    span.finish(outcome)
        except Exception as exc:  # the pipeline settles every outcome; this is the last guard
            await self._last_resort(delivery, exc)
        finally:
            self._handling.discard(task)
            if not self._handling:
                self._idle.set()

    async def _reject(
        self, delivery: Delivery, envelope: Envelope | None, fault: MessageFault, label: str, start_ns: int
    ) -> None:
        """Dead-letter a delivery that cannot be handled (bad signature, body or schema; stale;
        no handler): no handler runs and no dedup key is claimed."""
        metrics = self.metrics
        metrics.count_received(label)
        if isinstance(fault, EventExpired):
            metrics.count_expired(label)
        span = self._consume_span(self._tracing, delivery, envelope, start_ns)
        token = message_fields(self._log_fields(delivery, envelope))
        try:
            await self._dead_letter(delivery, fault.reason, str(fault))
        finally:
            reset_message_fields(token)
        if span is not None:
            span.finish("dead_lettered", f"{fault.reason}: {fault}")

    async def _last_resort(self, delivery: Delivery, exc: Exception) -> None:
        log.exception("unexpected error in pipeline; requeueing", agent=self.agent.name)
        try:
            await self._requeue(delivery, f"unexpected error: {exc!r}")
        except Exception:
            # Not even the requeue (or its dead-letter) went: hand it back to the broker as
            # it is, rather than leave it unsettled until the connection goes.
            log.exception("requeue failed; returning the message to the broker", agent=self.agent.name)
            with contextlib.suppress(Exception):
                await delivery.nack(requeue=True)

    def _verified_envelope(self, delivery: Delivery) -> Envelope:
        body = delivery.body
        if len(body) > self.settings.max_body_bytes:
            raise MalformedMessage(f"body of {len(body)} bytes exceeds the limit of {self.settings.max_body_bytes}")
        headers = delivery.headers
        if UNDECODABLE_PROPERTIES in headers:
            raise MalformedMessage(f"its AMQP properties could not be decoded: {headers[UNDECODABLE_PROPERTIES]}")
        self.settings.keyring.verify(body, headers)
        return parse_envelope(body)

    def _resolve(self, envelope: Envelope) -> tuple[HandlerSpec, Event]:
        if envelope.ttl_ms is not None:
            try:
                deadline = envelope.issued_at + timedelta(milliseconds=envelope.ttl_ms) + self._skew
            except OverflowError:  # a deadline past year 9999: never stale
                deadline = datetime.max.replace(tzinfo=UTC)
            if datetime.now(UTC) > deadline:
                raise EventExpired(f"issued {_timestamp_text(envelope.issued_at)} with ttl_ms={envelope.ttl_ms}")
        spec = self.agent.handler_for(envelope.type)
        if spec is None:
            raise UnknownEventType(f"agent {self.agent.name!r} has no handler for {envelope.type!r}")
        return spec, spec.event_cls.from_payload(envelope.payload)

    def _consume_span(
        self, tracing: otel.Tracing | None, delivery: Delivery, envelope: Envelope | None, start_ns: int
    ) -> otel.ConsumeSpan | None:
        """The delivery's consume span, started at receipt, once the envelope (if any) is known."""
        if tracing is None:
            return None
        span = tracing.consume(
            agent=self.agent.name,
            queue=self.queues.main,
            headers=delivery.headers,
            trace_id=envelope.trace_id if envelope is not None else None,
            event_id=envelope.id if envelope is not None else delivery.message_id,
            start_ns=start_ns,
        )
        if envelope is not None:
            span.set(**{"choreo.event_type": envelope.type, "messaging.message.id": envelope.id})
        return span

    def _log_fields(self, delivery: Delivery, envelope: Envelope | None) -> dict[str, Any]:
        """What every log line about this message carries."""
        if envelope is None:
            return {"agent": self.agent.name, "event_type": delivery.type, "event_id": delivery.message_id}
        return {
            "agent": self.agent.name,
            "event_type": envelope.type,
            "event_id": envelope.id,
            "trace_id": envelope.trace_id,
            "causation_id": envelope.causation_id,
        }

    async def _claim_and_handle(self, delivery: Delivery, envelope: Envelope, spec: HandlerSpec, event: Event) -> str:
        """Claim the dedup key and handle; returns the outcome (for the consume span)."""
        key = envelope.effective_dedup_key
        claim: Claim | None = None
        if key not in self._held:  # the common case, claimed at the first try: no frame of _claim's
            claim = await self.dedup.begin(self.agent.name, key, lease_s=self.lease_s)
        if claim is None or claim.status != "claimed":
            claim = await self._claim(key, first=claim)
        if claim is None:
            self.stats.duplicates += 1
            self.metrics.count_duplicate(envelope.type)
            if self._debug:
                log.debug("duplicate suppressed")
            await self._settle(delivery)
            return "duplicate"
        self._held[key] = claim
        try:
            return await self._handle(delivery, envelope, spec, event, claim)
        finally:
            del self._held[key]
            await claim.release()  # no-op once completed or released; frees it on any error
            for waiter in self._local_claims.pop(key, ()):
                if not waiter.done():
                    waiter.set_result(None)

    async def _claim(self, key: str, first: Claim | None = None) -> Claim | None:
        """The claim for ``key``, or None when the key is already done (a duplicate).
        ``first``: the outcome of a try already made (not "claimed"), if any."""
        backoff = 0.05
        # A claim held elsewhere ends within the holder's longest handling (it renews its lease
        # meanwhile) or one lease after the holder died; wait no longer than that.
        deadline = asyncio.get_running_loop().time() + self._worst_hold_s + self.lease_s + 1.0
        while True:
            if first is not None:
                claim, first = first, None
            elif key in self._held:  # the same key is being handled in this process: wait for it
                waiter = asyncio.get_running_loop().create_future()
                self._local_claims.setdefault(key, []).append(waiter)
                await waiter
                continue
            else:
                claim = await self.dedup.begin(self.agent.name, key, lease_s=self.lease_s)
            if claim.status == "claimed":
                return claim
            if claim.status == "done":
                return None
            if key in self._held:  # a delivery in this process claimed it meanwhile: wait for it
                continue
            # Held by another replica (or a crashed one whose lease runs out): keep the message
            # unacked and look again, rather than requeueing into a hot loop.
            if asyncio.get_running_loop().time() > deadline:
                raise TransportError(f"dedup key {key!r} stayed claimed past its lease")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def _handle(
        self, delivery: Delivery, envelope: Envelope, spec: HandlerSpec, event: Event, claim: Claim
    ) -> str:
        prior = self._prior_attempts(delivery)
        ctx: Context[Any] = Context(
            self.agent.name, envelope, self.state, attempt=prior + 1, transaction=claim.transaction
        )
        policy = self.agent.policy_for(spec)
        tracing = self._tracing
        metrics = self.metrics
        event_type = envelope.type

        async def call() -> list[OutgoingMessage]:
            started = time.perf_counter()
            try:
                async with claim.attempt():
                    if tracing is None:
                        result = await spec.fn(event, ctx)
                    else:
                        with tracing.handle(event_type, ctx.attempt):
                            result = await spec.fn(event, ctx)
            finally:
                elapsed = time.perf_counter() - started
                metrics.handler_seconds(event_type, elapsed)
                self.latency.add(elapsed)
            try:
                return self._emitted_messages(envelope, result)
            except TypeError as exc:  # a wrong return type is a bug: retrying will not fix it
                raise Reject(f"TypeError: {exc}") from exc

        try:
            messages, tries = await run_with_retries(call, policy, self._deadlines)
        except HandlerError as failure:
            self.stats.failed += 1
            metrics.count_failed(event_type)
            metrics.count_retried(event_type, failure.tries - 1)
            log.warning("handler failed", tries=failure.tries, permanent=failure.permanent, error=repr(failure.error))
            return await self._on_failure(
                delivery,
                envelope=envelope,
                spec=spec,
                event=event,
                failure=failure,
                claim=claim,
                attempts=prior + failure.tries,
            )
        if tries > 1:
            self.stats.retried_in_process += tries - 1
            metrics.count_retried(event_type, tries - 1)
        if await self._publish_then_ack(delivery, claim, messages, envelope.trace_id):
            self.stats.handled += 1
            metrics.count_handled(event_type)
            if self._debug:
                log.debug("handled", emitted=len(messages), tries=tries)
            return "handled"
        return "requeued"

    async def _publish_then_ack(
        self, delivery: Delivery, claim: Claim, messages: list[OutgoingMessage], trace_id: str
    ) -> bool:
        """Publish ``messages`` (confirmed), mark the claim done, ack. False if not confirmed."""
        if messages:
            tracing = self._tracing
            spans = (
                [tracing.publish(m.headers, m.routing_key, m.message_id, trace_id=trace_id) for m in messages]
                if tracing is not None
                else []
            )
            started = time.perf_counter()
            try:
                await self.transport.publish_many(messages)
            except TransportError as exc:
                for span in spans:
                    otel.Tracing.end(span, exc)
                # Not confirmed: nothing is marked done, the message returns to the queue and the
                # re-run re-emits the same ids, which downstream dedup absorbs.
                await claim.release()
                log.warning("emitted events not confirmed; requeueing", agent=self.agent.name, error=repr(exc))
                await self._requeue(delivery, f"emitted events not confirmed: {exc}")
                return False
            self.metrics.confirm_seconds(time.perf_counter() - started)
            for span in spans:
                otel.Tracing.end(span)
        await claim.complete()
        self.stats.emitted += len(messages)
        try:  # _settle's ack, inline: one frame fewer to resume
            await delivery.ack()
        except TransportError as exc:
            self._settle_failed(delivery, exc)
        return True

    async def _on_failure(
        self,
        delivery: Delivery,
        *,
        envelope: Envelope,
        spec: HandlerSpec,
        event: Event,
        failure: HandlerError,
        claim: Claim,
        attempts: int,
    ) -> str:
        """Delayed retry if the failure is transient and the budget allows; otherwise the
        handler's failure event (compensation) or the DLQ."""
        policy = self.agent.policy_for(spec)
        delayed = _int_header(delivery.headers.get(DELAYED))
        budget = len(self._tiers_ms) if policy.delayed is None else policy.delayed
        # A Reject's message is the handler's own explanation; other errors are named by type.
        err = failure.error
        error = str(err) if isinstance(err, Reject) else f"{type(err).__name__}: {err}"
        if not failure.permanent and delayed < budget and self._tiers_ms:
            await claim.release()  # the retry must be able to claim it
            tier = self._tiers_ms[min(delayed, len(self._tiers_ms) - 1)]
            if await self._move(
                delivery, self.queues.retry(tier), {ATTEMPTS: attempts, DELAYED: delayed + 1, ERROR: error}
            ):
                self.stats.retried_delayed += 1
                self.metrics.count_retried(envelope.type)
                log.info("delayed retry scheduled", retry_queue=self.queues.retry(tier), attempts=attempts)
                return "retry_scheduled"
            return "requeued"
        reason: FaultReason = "handler_error" if failure.permanent else "retries_exhausted"
        if spec.on_failure is not None:
            try:
                failure_event = spec.on_failure(event, Failure(reason, error, attempts, envelope))
                messages = self._emitted_messages(envelope, failure_event)
            except Exception as exc:
                error = f"{error}; on_failure raised {type(exc).__name__}: {exc}"
            else:
                # The claim is still ours: the failure event is this event's outcome.
                if await self._publish_then_ack(delivery, claim, messages, envelope.trace_id):
                    self.stats.compensated += 1
                    log.info("failure event published", reason=reason, emitted=[m.routing_key for m in messages])
                    return "compensated"
                return "requeued"
        await claim.release()  # a replay from the DLQ must run again
        await self._dead_letter(delivery, reason, error, attempts=attempts)
        return "dead_lettered"

    def _emitted_messages(self, parent: Envelope, result: object) -> list[OutgoingMessage]:
        events = emitted_events(result)
        if not events:  # the common case of a handler that only acts: no clock, no counter
            return []
        issued_at = now_timestamp()
        # Ordinals count per type; a single event (the common case) is ordinal 0.
        ordinals: collections.Counter[str] | None = collections.Counter() if len(events) > 1 else None
        agent, settings = self.agent.name, self.settings
        correlation_id = parent.effective_correlation_id
        messages = []
        for item in events:
            event_type = item.event_type()
            ordinal = 0
            if ordinals is not None:
                ordinal = ordinals[event_type]
                ordinals[event_type] += 1
            event_id = derived_id(parent.id, agent, event_type, ordinal)
            ttl_ms = type(item).__event_ttl_ms__
            # Encoded from its parts: every one is choreo's own or already checked (the type
            # by Event's class definition), so no Envelope is built just to be encoded.
            body = codec.dumps(
                wire_fields(
                    id=event_id,
                    type=event_type,
                    source=agent,
                    issued_at=issued_at,
                    trace_id=parent.trace_id,
                    causation_id=parent.id,
                    correlation_id=correlation_id,
                    dedup_key=None,
                    ttl_ms=ttl_ms,
                    payload=item.to_payload(),
                )
            )
            messages.append(
                signed_message(
                    body,
                    settings.keyring,
                    settings.naming.exchange,
                    event_type=event_type,
                    event_id=event_id,
                    correlation_id=correlation_id,
                    trace_id=parent.trace_id,
                    ttl_ms=ttl_ms,
                    expiration_slack_ms=settings.clock_skew_ms,
                )
            )
        return messages

    def _prior_attempts(self, delivery: Delivery) -> int:
        """Handler runs before this delivery: counted in our header, plus the redeliveries the
        quorum queue counted (``x-delivery-count``) after crashes or lost connections."""
        headers = delivery.headers
        ours, broker = headers.get(ATTEMPTS), headers.get("x-delivery-count")
        if ours is None and broker is None:  # a first delivery, the common case
            return 0
        return _int_header(ours) + _int_header(broker)

    async def _move(self, delivery: Delivery, queue: str, extra: dict[str, HeaderValue]) -> bool:
        """Publish the message, body and signature untouched, to ``queue`` with ``extra`` headers,
        wait for the confirm, then ack the original. On failure the original is requeued."""
        headers: dict[str, HeaderValue] = dict(delivery.headers)  # type: ignore[arg-type]
        headers.pop("x-delivery-count", None)
        headers.setdefault(ORIGINAL_RK, delivery.routing_key)
        headers.update(extra)
        message = OutgoingMessage(
            exchange="",
            routing_key=queue,
            body=delivery.body,
            headers=headers,
            message_id=delivery.message_id,
            correlation_id=delivery.correlation_id,
            type=delivery.type,
            mandatory=True,
        )
        try:
            try:
                await self.transport.publish(message)
            except HeadersNotSendable as exc:
                message.headers = _trimmed(headers, extra)
                log.warning(
                    "headers too large to move; moving with the essential ones",
                    queue=queue,
                    error=str(exc),
                    dropped=message.headers[DROPPED],
                )
                await self.transport.publish(message)
        except TransportError as exc:
            log.error("move not confirmed; requeueing", agent=self.agent.name, queue=queue, error=repr(exc))
            await self._requeue(delivery, f"move to {queue} not confirmed: {exc}", may_dead_letter=False)
            return False
        await self._settle(delivery)
        return True

    async def _dead_letter(self, delivery: Delivery, reason: str, error: str, *, attempts: int | None = None) -> None:
        """Move to the agent's DLQ with the fault headers of the wire format; body and signature
        headers stay unchanged so a replay is still verifiable."""
        fault: dict[str, HeaderValue] = {
            REASON: reason,
            ERROR: error[:_MAX_ERROR_CHARS],
            AGENT: self.agent.name,
            ATTEMPTS: attempts if attempts is not None else self._prior_attempts(delivery) + 1,
            FAILED_AT: now_timestamp(),
        }
        if await self._move(delivery, self.queues.dlq, fault):
            self.stats.dead_lettered[reason] += 1
            self.metrics.count_dead_lettered(reason)
            log.warning("dead-lettered", reason=reason, error=error[:200])

    async def _requeue(self, delivery: Delivery, error: str, *, may_dead_letter: bool = True) -> None:
        """Return the message to its queue after a backoff, for an infrastructure failure.

        Requeues count against the queue's ``x-delivery-limit``; rather than let the broker
        drop the message into the DLQ bare on the last one, it is dead-lettered here with its
        fault headers (``retries_exhausted``).
        """
        redeliveries = _int_header(delivery.headers.get("x-delivery-count"))
        if may_dead_letter and redeliveries + 1 >= self.settings.delivery_limit:
            await self._dead_letter(delivery, "retries_exhausted", f"requeued {redeliveries + 1} times, last: {error}")
            return
        # Back off so a broker or store outage is not met with a hot redelivery loop.
        await asyncio.sleep(min(0.1 * 2**redeliveries, 5.0))
        await self._settle(delivery, requeue=True)

    async def _settle(self, delivery: Delivery, *, requeue: bool | None = None) -> None:
        try:
            if requeue is None:
                await delivery.ack()
            else:
                self.stats.requeued += 1
                await delivery.nack(requeue=requeue)
        except TransportError as exc:
            self._settle_failed(delivery, exc)

    def _settle_failed(self, delivery: Delivery, exc: TransportError) -> None:
        """The channel is gone: the broker redelivers the message and dedup absorbs a re-run.
        Logs the first failure at once; the others of the next second, or until :meth:`stop`,
        in one line."""
        self.stats.settle_failed += 1
        if self._settle_report is not None:
            self._unreported_settles += 1
            if len(self._unreported_ids) < _SETTLE_REPORT_IDS:
                self._unreported_ids.append(delivery.message_id or "?")
            return
        log.warning(
            "settle failed; the broker redelivers the message",
            agent=self.agent.name,
            event_id=delivery.message_id,
            error=repr(exc),
        )
        self._settle_report = asyncio.get_running_loop().call_later(_SETTLE_REPORT_S, self._report_settle_failures)

    def _report_settle_failures(self) -> None:
        if self._settle_report is not None:
            self._settle_report.cancel()  # when called by stop() ahead of the timer
            self._settle_report = None
        count, ids = self._unreported_settles, self._unreported_ids
        self._unreported_settles, self._unreported_ids = 0, []
        if count:
            log.warning(
                "more settles failed with the channel; the broker redelivers those messages",
                agent=self.agent.name,
                count=count,
                event_ids=ids,
            )
