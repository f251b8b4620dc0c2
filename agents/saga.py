"""Run the order saga end to end and check every order ended correctly.

Shared by ``choreo demo`` and the end-to-end tests, so both check the same thing:
each order ends in exactly one ``order.completed`` / ``order.cancelled`` with the reason its
plan calls for, and with exactly the compensations that failure requires.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from choreo import Agent, Context, Keyring, Publisher, Settings, Worker
from choreo.envelope import Envelope
from choreo.errors import TransportError
from choreo.publisher import new_envelope, to_message
from choreo.transport.base import Transport

from . import inventory, orders, payments, shipping
from .events import (
    InventoryReleased,
    Item,
    OrderCancelled,
    OrderCompleted,
    OrderPlaced,
    PaymentCaptured,
    PaymentRefunded,
)

Outcome = Literal["completed", "out_of_stock", "payment_declined", "shipping_failed"]
# A scenario is how an order is set up to go; several scenarios can end in the same outcome.
Scenario = Literal["completed", "out_of_stock", "payment_declined", "shipping_failed", "gateway_refused"]
OUTCOMES: tuple[Outcome, ...] = ("completed", "out_of_stock", "payment_declined", "shipping_failed")
ALL_SCENARIOS: tuple[Scenario, ...] = (*OUTCOMES, "gateway_refused")
OUTCOME_OF: dict[Scenario, Outcome] = {**{o: o for o in OUTCOMES}, "gateway_refused": "payment_declined"}
SAGA_AGENTS: tuple[Agent[Any], ...] = (inventory.agent, payments.agent, shipping.agent, orders.agent)
# Compensations each outcome calls for: (inventory.released, payment.refunded).
EXPECTED_COMPENSATIONS: dict[Outcome, tuple[int, int]] = {
    "completed": (0, 0),
    "out_of_stock": (0, 0),
    "payment_declined": (1, 0),
    "shipping_failed": (1, 1),
}

# Payments captured per outcome: once for orders that reached shipping, never otherwise.
CAPTURES: dict[Outcome, int] = {"completed": 1, "out_of_stock": 0, "payment_declined": 0, "shipping_failed": 1}


@dataclass(frozen=True)
class OrderPlan:
    scenario: Scenario
    event: OrderPlaced

    @property
    def order_id(self) -> str:
        return self.event.order_id

    @property
    def expected(self) -> Outcome:
        return OUTCOME_OF[self.scenario]


def plan_orders(
    n: int, *, seed: int = 7, run_id: str = "", scenarios: tuple[Scenario, ...] = OUTCOMES
) -> list[OrderPlan]:
    """``n`` orders mixing ``scenarios`` (each at least once when ``n`` >= their number)."""
    rng = random.Random(seed)
    plans = []
    for i in range(n):
        outcome = scenarios[i] if i < len(scenarios) else rng.choice(scenarios)
        items = [Item(sku=f"sku-{rng.randrange(1000)}", qty=rng.randint(1, 3)) for _ in range(rng.randint(1, 3))]
        if outcome == "out_of_stock":
            items.append(Item(sku=f"oos-{rng.randrange(100)}", qty=1))
        total = rng.randint(60_000, 90_000) if outcome == "payment_declined" else rng.randint(500, 50_000)
        country = "XX" if outcome == "shipping_failed" else rng.choice(["DE", "FR", "NL", "US"])
        blocked = "blocked-" if outcome == "gateway_refused" else ""
        event = OrderPlaced(
            order_id=f"o-{run_id}{i:06d}",
            customer_id=f"c-{blocked}{rng.randrange(10_000)}",
            country=country,
            items=items,
            total_cents=total,
            currency="EUR",
        )
        plans.append(OrderPlan(outcome, event))
    return plans


@dataclass
class AuditLog:
    """What the auditor saw, by order id. Keyed by event id, so redeliveries count once."""

    terminals: dict[str, dict[str, str]] = field(default_factory=lambda: collections.defaultdict(dict))
    releases: dict[str, set[str]] = field(default_factory=lambda: collections.defaultdict(set))
    captures: dict[str, set[str]] = field(default_factory=lambda: collections.defaultdict(set))
    refunds: dict[str, set[str]] = field(default_factory=lambda: collections.defaultdict(set))
    ended_at: dict[str, float] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)


def auditor_agent(log: AuditLog, name: str = "auditor") -> Agent[AuditLog]:
    """An observer agent recording terminal events and compensations (not part of the saga)."""
    agent: Agent[AuditLog] = Agent(name, state=lambda _env: log)

    @agent.on(OrderCompleted, OrderCancelled)
    async def ended(event: OrderCompleted | OrderCancelled, ctx: Context[AuditLog]) -> None:
        outcome = "completed" if isinstance(event, OrderCompleted) else event.reason
        ctx.state.terminals[event.order_id][ctx.event_id] = outcome
        ctx.state.ended_at.setdefault(event.order_id, time.monotonic())
        ctx.state.changed.set()

    @agent.on(InventoryReleased)
    async def released(event: InventoryReleased, ctx: Context[AuditLog]) -> None:
        ctx.state.releases[event.order_id].add(ctx.event_id)

    @agent.on(PaymentCaptured)
    async def captured(event: PaymentCaptured, ctx: Context[AuditLog]) -> None:
        ctx.state.captures[event.order_id].add(ctx.event_id)

    @agent.on(PaymentRefunded)
    async def refunded(event: PaymentRefunded, ctx: Context[AuditLog]) -> None:
        ctx.state.refunds[event.order_id].add(ctx.event_id)

    return agent


@dataclass
class SagaReport:
    orders: int
    completed: int = 0
    cancelled: collections.Counter[str] = field(default_factory=collections.Counter)
    releases: int = 0
    refunds: int = 0
    captures: int = 0
    duplicates_published: int = 0
    duplicates_suppressed: int = 0
    compensated: dict[str, int] = field(default_factory=dict)  # failure events published, by agent
    dead_lettered: collections.Counter[str] = field(default_factory=collections.Counter)
    latencies_ms: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def ended(self) -> int:
        """Orders that reached a terminal event (completed or cancelled)."""
        return self.completed + sum(self.cancelled.values())

    @property
    def dead_lettered_total(self) -> int:
        return sum(self.dead_lettered.values())

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return 0.0
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def verify(plans: Sequence[OrderPlan], log: AuditLog) -> list[str]:
    """Every problem with how the orders ended; empty when all is right."""
    problems = []
    for plan in plans:
        oid = plan.order_id
        seen = log.terminals.get(oid, {})
        if len(seen) != 1:
            problems.append(f"{oid}: {len(seen)} terminal events {sorted(seen.values())}, expected exactly 1")
            continue
        (outcome,) = seen.values()
        if outcome != plan.expected:
            problems.append(f"{oid}: ended {outcome}, expected {plan.expected}")
        want = EXPECTED_COMPENSATIONS[plan.expected]
        got = (len(log.releases.get(oid, ())), len(log.refunds.get(oid, ())))
        if got != want:
            problems.append(f"{oid} ({plan.expected}): releases/refunds {got}, expected {want}")
        captures = len(log.captures.get(oid, ()))
        if captures != CAPTURES[plan.expected]:
            problems.append(f"{oid} ({plan.expected}): captured {captures} times, expected {CAPTURES[plan.expected]}")
    return problems


def bad_messages(keyring: Keyring, exchange: str) -> list[tuple[str, Any]]:
    """Two messages that must be dead-lettered: a tampered signature and a non-JSON body."""
    env = new_envelope("order.placed", {"order_id": "o-tampered"}, source="demo")
    tampered = to_message(env, keyring, exchange)
    tampered.body = tampered.body.replace(b"o-tampered", b"o-tampereD")
    garbage = to_message(env, keyring, exchange)
    garbage.body = b"\xff not json"
    garbage.headers.update(keyring.sign(garbage.body))
    return [("signature", tampered), ("malformed", garbage)]


class SagaRun:
    """One run of the saga, observed by an auditor agent in this process.

    ``in_process=True`` also runs the four saga agents here (demo, end-to-end tests); with
    False they run elsewhere, e.g. as ``choreo worker`` processes (chaos tests), and only
    what the auditor and the broker show is checked.
    """

    def __init__(
        self, transport: Transport, settings: Settings, plans: Sequence[OrderPlan], *, in_process: bool = True
    ) -> None:
        self.transport = transport
        self.settings = settings
        self.plans = list(plans)
        self.in_process = in_process
        self.log = AuditLog()
        agents: list[Agent[Any]] = [*SAGA_AGENTS] if in_process else []
        self.worker = Worker([*agents, auditor_agent(self.log)], settings=settings, transport=transport)
        self.report = SagaReport(orders=len(plans))
        self.sent_at: dict[str, float] = {}
        self.expected_dead: collections.Counter[str] = collections.Counter()
        self._started = 0.0

    async def __aenter__(self) -> SagaRun:
        await self.worker.start()
        self._started = time.monotonic()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.worker.stop()

    async def publish_all(
        self,
        *,
        duplicate_every: int = 20,
        inject_bad: bool = True,
        window: int = 100,
        rate: float | None = None,
        before_window: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        """Publish every plan's order (in confirmed windows), some duplicates and bad messages.
        ``rate`` (orders per second) paces the windows; by default they go as fast as confirmed.
        ``before_window(start)`` is awaited before the window that begins at order ``start``, so
        a test can hold the rest of the run back until something has happened (pacing resumes
        from there, without a burst to catch up).

        A publish the broker did not confirm (connections dropped mid-run) is sent again with
        the same envelope: at-least-once from the shop, exactly-once effects through dedup.
        """
        publisher = Publisher(transport=self.transport, settings=self.settings, source="demo-shop")
        envelopes = [new_envelope("order.placed", p.event.to_payload(), source="demo-shop") for p in self.plans]
        began = time.monotonic()
        for start in range(0, len(envelopes), window):
            if before_window is not None:
                held_from = time.monotonic()
                await before_window(start)
                began += time.monotonic() - held_from
            if rate:
                await asyncio.sleep(max(0.0, began + start / rate - time.monotonic()))
            batch = list(zip(self.plans[start : start + window], envelopes[start : start + window], strict=True))
            for plan, _ in batch:
                self.sent_at[plan.order_id] = time.monotonic()
            await asyncio.gather(*(self._publish_until_confirmed(publisher, env) for _, env in batch))
        if duplicate_every:
            for env in envelopes[::duplicate_every]:
                await self._publish_until_confirmed(publisher, env)
                self.report.duplicates_published += 1
        if inject_bad:
            for reason, message in bad_messages(self.settings.keyring, self.settings.naming.exchange):
                await self.transport.publish(message)
                self.expected_dead[reason] += 1

    async def _publish_until_confirmed(self, publisher: Publisher, envelope: Envelope, attempts: int = 60) -> None:
        for attempt in range(attempts):
            try:
                await publisher.publish_envelope(envelope)
                return
            except TransportError:
                if attempt == attempts - 1:
                    raise
                await asyncio.sleep(0.5)  # the robust connection is reconnecting

    async def wait(self, timeout_s: float = 120.0, on_progress: Callable[[int], None] | None = None) -> None:
        """Until every order ended and the system is quiet, or ``timeout_s``; verify() tells which."""
        order_ids = [p.order_id for p in self.plans]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while True:
                    ended = self.ended
                    if on_progress:
                        on_progress(ended)
                    if ended == len(order_ids) and not verify(self.plans, self.log) and await self._quiet():
                        break
                    self.log.changed.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.2):
                            await self.log.changed.wait()
        self.report.elapsed_s = time.monotonic() - self._started

    @property
    def ended(self) -> int:
        return sum(1 for p in self.plans if p.order_id in self.log.terminals)

    def queues(self) -> list[str]:
        names = []
        for agent in (*SAGA_AGENTS, self.worker.runtimes[-1].agent):
            queues = self.settings.naming.agent_queues(agent.name)
            names.append(queues.main)
            names.extend(queues.retry(ms) for ms in agent.retry_tiers_ms)
        return names

    async def _quiet(self) -> bool:
        """Nothing queued anywhere and no handler running here, three looks in a row."""
        for _ in range(3):
            if any(r.in_flight for r in self.worker.runtimes):
                return False
            for queue in self.queues():
                if await self.transport.queue_depth(queue):
                    return False
            await asyncio.sleep(0.1)
        return True

    def finish(self) -> SagaReport:
        """The report; call after the run stopped."""
        report, log = self.report, self.log
        report.problems = verify(self.plans, log)
        for plan in self.plans:
            for outcome in log.terminals.get(plan.order_id, {}).values():
                if outcome == "completed":
                    report.completed += 1
                else:
                    report.cancelled[outcome] += 1
            if plan.order_id in log.ended_at:
                report.latencies_ms.append((log.ended_at[plan.order_id] - self.sent_at[plan.order_id]) * 1000)
        report.releases = sum(len(v) for v in log.releases.values())
        report.refunds = sum(len(v) for v in log.refunds.values())
        report.captures = sum(len(v) for v in log.captures.values())
        if not self.in_process:
            return report  # the agents' own counters live in their processes
        for runtime in self.worker.runtimes:
            report.duplicates_suppressed += runtime.stats.duplicates
            if runtime.stats.compensated:
                report.compensated[runtime.agent.name] = runtime.stats.compensated
            report.dead_lettered.update(runtime.stats.dead_lettered)
        if report.dead_lettered != self.expected_dead:
            report.problems.append(f"dead-lettered {dict(report.dead_lettered)}, expected {dict(self.expected_dead)}")
        if report.duplicates_suppressed < report.duplicates_published:
            report.problems.append(
                f"{report.duplicates_published} duplicates published but only {report.duplicates_suppressed} suppressed"
            )
        return report


async def run_saga(
    transport: Transport,
    settings: Settings,
    plans: Sequence[OrderPlan],
    *,
    duplicate_every: int = 20,
    inject_bad: bool = True,
    timeout_s: float = 120.0,
    on_progress: Callable[[int], None] | None = None,
) -> SagaReport:
    """Run the four agents and an auditor here, publish ``plans``, wait until every order ended
    and the system is quiet, then verify. The transport must be connected."""
    run = SagaRun(transport, settings, plans)
    async with run:
        await run.publish_all(duplicate_every=duplicate_every, inject_bad=inject_bad)
        await run.wait(timeout_s, on_progress)
    return run.finish()
