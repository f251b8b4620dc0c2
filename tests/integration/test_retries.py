"""Retries, permanent failures, failure events and poison messages, on both transports."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import choreo
from choreo import Agent, Context, Event, Publisher, Reject, Settings, Worker
from choreo.codec import loads_object
from choreo.retry import RetryPolicy
from choreo.testing import wait_for
from choreo.transport import Delivery, Transport

FAST = RetryPolicy(attempts=2, backoff_s=0.01, max_backoff_s=0.01, timeout_s=2)
TIERS = (0.05, 0.1)  # seconds; tests keep the broker-delayed retries short


class Job(Event, type="job.submitted"):
    n: int


class JobDone(Event, type="job.done"):
    n: int


class JobFailed(Event, type="job.failed"):
    n: int
    error: str
    attempts: int


class FlakyError(Exception):
    pass


class BrokenError(Exception):
    pass


async def take(transport: Transport, queue: str, n: int, within: float = 20) -> list[Delivery]:
    got: list[Delivery] = []

    async def poll() -> bool:
        delivery = await transport.get(queue)
        if delivery is not None:
            got.append(delivery)
            await delivery.ack()
        return len(got) >= n

    await wait_for(poll, within=within, what=f"{n} message(s) in {queue}")
    return got


async def test_transient_failures_retry_in_process_then_through_own_retry_queue_then_dlq(
    transport_factory: Callable[[], Awaitable[Transport]], settings: Settings
) -> None:
    transport = await transport_factory()
    calls: list[int] = []
    agent: Agent[None] = Agent("retrier", retry=FAST, retry_tiers_s=TIERS)

    @agent.on(Job)
    async def handle(event: Job, ctx: Context[None]) -> None:
        calls.append(ctx.attempt)
        raise FlakyError(f"try {len(calls)}")

    # Another agent bound to the same type: it must see the event once, never the retries.
    seen_by_other: list[int] = []
    other: Agent[None] = Agent("bystander")

    @other.on(Job)
    async def watch(event: Job, ctx: Context[None]) -> None:
        seen_by_other.append(event.n)

    worker = Worker([agent, other], settings=settings, transport=transport)
    await worker.start()
    try:
        async with Publisher(transport=transport, settings=settings, source="t") as publisher:
            await publisher.publish(Job(n=1))
        runtime = worker.runtimes[0]
        await wait_for(lambda: runtime.stats.dead_lettered["retries_exhausted"] == 1, within=20, what="exhaustion")
        (dead,) = await take(transport, settings.naming.agent_queues("retrier").dlq, 1)
    finally:
        await worker.stop()

    # 2 in-process tries per delivery, 1 first delivery + 2 delayed retries (one per tier).
    assert len(calls) == 6
    assert calls == [1, 1, 3, 3, 5, 5]  # ctx.attempt counts runs before each delivery
    assert runtime.stats.retried_delayed == 2
    assert runtime.stats.retried_in_process == 0  # none of the deliveries succeeded
    assert seen_by_other == [1]
    headers = dead.headers
    assert headers["x-choreo-reason"] == "retries_exhausted"
    assert int(str(headers["x-choreo-attempts"])) == 6
    assert "FlakyError: try 6" in str(headers["x-choreo-error"])
    assert headers["x-choreo-original-routing-key"] == "job.submitted"
    assert loads_object(dead.body)["payload"] == {"n": 1}


async def test_in_process_retry_recovers_without_broker_retry(
    transport_factory: Callable[[], Awaitable[Transport]], settings: Settings
) -> None:
    transport = await transport_factory()
    calls: list[int] = []
    agent: Agent[None] = Agent("recoverer", retry=RetryPolicy(attempts=3, backoff_s=0.01), retry_tiers_s=TIERS)

    @agent.on(Job)
    async def handle(event: Job, ctx: Context[None]) -> JobDone:
        calls.append(event.n)
        if len(calls) < 3:
            raise choreo.Retry("not yet")
        return JobDone(n=event.n)

    worker = Worker([agent], settings=settings, transport=transport)
    await worker.start()
    try:
        async with Publisher(transport=transport, settings=settings, source="t") as publisher:
            await publisher.publish(Job(n=5))
        runtime = worker.runtimes[0]
        await wait_for(lambda: runtime.stats.handled == 1, within=10, what="handling")
    finally:
        await worker.stop()
    assert calls == [5, 5, 5]
    assert runtime.stats.retried_in_process == 2
    assert runtime.stats.retried_delayed == 0
    assert runtime.stats.dead_lettered_total == 0


async def test_permanent_errors_and_timeouts(
    transport_factory: Callable[[], Awaitable[Transport]], settings: Settings
) -> None:
    transport = await transport_factory()
    calls: list[int] = []
    policy = RetryPolicy(attempts=3, backoff_s=0.01, timeout_s=0.2, permanent=(BrokenError,), delayed=0)
    agent: Agent[None] = Agent("strict", retry=policy, retry_tiers_s=TIERS)
    release = asyncio.Event()

    @agent.on(Job)
    async def handle(event: Job, ctx: Context[None]) -> None:
        calls.append(event.n)
        if event.n == 1:
            raise BrokenError("declared permanent")
        if event.n == 2:
            raise Reject("rejected by the handler")
        await release.wait()  # n == 3: never finishes in time

    worker = Worker([agent], settings=settings, transport=transport)
    await worker.start()
    try:
        async with Publisher(transport=transport, settings=settings, source="t") as publisher:
            for n in (1, 2, 3):
                await publisher.publish(Job(n=n))
        dead = await take(transport, settings.naming.agent_queues("strict").dlq, 3)
    finally:
        release.set()
        await worker.stop()
    by_n = {loads_object(d.body)["payload"]["n"]: d.headers for d in dead}
    assert by_n[1]["x-choreo-reason"] == "handler_error"
    assert int(str(by_n[1]["x-choreo-attempts"])) == 1
    assert by_n[2]["x-choreo-reason"] == "handler_error"
    assert by_n[2]["x-choreo-error"] == "rejected by the handler"
    # A timeout is transient: 3 tries in process, no delayed retries allowed, so exhausted.
    assert by_n[3]["x-choreo-reason"] == "retries_exhausted"
    assert int(str(by_n[3]["x-choreo-attempts"])) == 3
    assert "TimeoutError" in str(by_n[3]["x-choreo-error"])
    assert sorted(calls) == [1, 2, 3, 3, 3]


async def test_failure_event_is_published_instead_of_dead_lettering(
    transport_factory: Callable[[], Awaitable[Transport]], settings: Settings
) -> None:
    transport = await transport_factory()
    agent: Agent[None] = Agent("compensating", retry=FAST, retry_tiers_s=TIERS)

    def failed(event: Job, failure: choreo.Failure) -> JobFailed:
        return JobFailed(n=event.n, error=f"{failure.reason}: {failure.error}", attempts=failure.attempts)

    @agent.on(Job, on_failure=failed)
    async def handle(event: Job, ctx: Context[None]) -> None:
        raise Reject("card expired") if event.n == 1 else FlakyError("gateway down")

    listening: Agent[None] = Agent("listener")
    received: list[tuple[choreo.Envelope, JobFailed]] = []

    @listening.on(JobFailed)
    async def on_failed(event: JobFailed, ctx: Context[None]) -> None:
        received.append((ctx.envelope, event))

    worker = Worker([agent, listening], settings=settings, transport=transport)
    await worker.start()
    try:
        async with Publisher(transport=transport, settings=settings, source="t") as publisher:
            permanent = await publisher.publish(Job(n=1))
            transient = await publisher.publish(Job(n=2))
        await wait_for(lambda: len(received) == 2, within=20, what="two failure events")
    finally:
        await worker.stop()
    runtime = worker.runtimes[0]
    assert runtime.stats.dead_lettered_total == 0
    assert runtime.stats.compensated == 2
    by_n = {event.n: (envelope, event) for envelope, event in received}
    env1, ev1 = by_n[1]
    assert ev1.error == "handler_error: card expired"
    assert ev1.attempts == 1
    assert env1.causation_id == permanent.id
    assert env1.trace_id == permanent.trace_id
    assert env1.correlation_id == permanent.id
    env2, ev2 = by_n[2]
    assert ev2.error == "retries_exhausted: FlakyError: gateway down"
    assert ev2.attempts == 6
    assert env2.causation_id == transient.id


async def test_poison_message_does_not_block_the_events_behind_it(
    transport_factory: Callable[[], Awaitable[Transport]], settings: Settings
) -> None:
    transport = await transport_factory()
    handled: list[int] = []
    poison_tries: list[int] = []
    agent: Agent[None] = Agent("poisoned", retry=FAST, retry_tiers_s=(0.3, 0.6))

    @agent.on(Job)
    async def handle(event: Job, ctx: Context[None]) -> None:
        if event.n == 0:
            poison_tries.append(ctx.attempt)
            raise FlakyError("always fails")
        handled.append(event.n)

    worker = Worker([agent], settings=settings, transport=transport)
    await worker.start()
    runtime = worker.runtimes[0]
    try:
        async with Publisher(transport=transport, settings=settings, source="t") as publisher:
            await publisher.publish(Job(n=0))
            for n in range(1, 51):
                await publisher.publish(Job(n=n))
            # Everything behind the poison message is handled while it is still retrying.
            await wait_for(lambda: len(handled) == 50, within=20, what="the 50 events behind the poison")
            assert runtime.stats.dead_lettered_total == 0
            await wait_for(lambda: runtime.stats.dead_lettered["retries_exhausted"] == 1, within=20, what="poison DLQ")
            for n in range(51, 61):
                await publisher.publish(Job(n=n))
            await wait_for(lambda: len(handled) == 60, within=20, what="the events after it was dead-lettered")
    finally:
        await worker.stop()
    assert sorted(handled) == list(range(1, 61))
    assert len(poison_tries) == 6  # bounded: it never loops
