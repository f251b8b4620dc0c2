"""DLQ operations on the in-memory broker: a replay that fails again comes back counted."""

from __future__ import annotations

import pytest

from choreo import Agent, Context, Event, Keyring, Settings, Worker
from choreo.dlq import DlqFilter, PurgeIncompleteError, peek, purge, replay
from choreo.publisher import new_envelope, to_message
from choreo.runtime import REASON
from choreo.testing import wait_for
from choreo.topology import QueueSpec, Topology
from choreo.transport import InMemoryBroker, InMemoryTransport, OutgoingMessage
from choreo.transport.memory import _Delivery


class Note(Event, type="note.taken"):
    text: str


async def test_a_replay_that_fails_again_returns_with_attempts_counted_and_never_loops(settings: Settings) -> None:
    transport = InMemoryBroker().transport()
    await transport.connect()
    agent: Agent[None] = Agent("notes")

    @agent.on(Note)
    async def take(event: Note, ctx: Context[None]) -> None:
        return None

    worker = Worker([agent], settings=settings, transport=transport)
    await worker.start()
    queues = settings.naming.agent_queues("notes")
    runtime = worker.runtimes[0]
    try:
        unknown = Keyring.hmac(("k-unknown", "s"))  # the worker still lacks this key
        envelope = new_envelope("note.taken", {"text": "hi"}, source="t")
        await transport.publish(to_message(envelope, unknown, settings.naming.exchange))
        await wait_for(lambda: runtime.stats.dead_lettered_total == 1, within=5, what="the first dead letter")
        for round_ in (1, 2):
            result = await replay(transport, queues, where=DlqFilter(reason="signature"))
            assert result.replayed == 1  # only what was there when the replay started
            await wait_for(lambda r=round_: runtime.stats.dead_lettered_total == r + 1, within=5, what="failing again")
        (dead,) = await peek(transport, queues.dlq)
    finally:
        await worker.stop()
    assert dead.reason == "signature"
    assert dead.attempts == 3  # counted across replays
    assert dead.headers["x-choreo-replayed"] == 2
    assert dead.body == to_message(envelope, unknown, settings.naming.exchange).body  # untouched


async def _dlq_with(transport: InMemoryTransport, settings: Settings, reasons: list[str]) -> str:
    queues = settings.naming.agent_queues("bulk")
    await transport.declare(
        Topology(settings.naming.exchange, (QueueSpec(queues.main, {}, ()), QueueSpec(queues.dlq, {}, ())))
    )
    await transport.publish_many(
        [OutgoingMessage("", queues.dlq, f"m{n}".encode(), {REASON: reason}) for n, reason in enumerate(reasons)]
    )
    return queues.dlq


@pytest.mark.parametrize("reason", [None, "malformed"])
async def test_purge_and_replay_never_settle_a_delivery_twice(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, reason: str | None
) -> None:
    # On RabbitMQ a second settle closes the channel (PRECONDITION_FAILED) and drops the
    # settles in flight: the purged messages come back. Here it is counted.
    twice: list[bytes] = []
    settle = _Delivery._settle

    def counting_settle(self: _Delivery) -> None:
        if self.settled:
            twice.append(self.body)
        settle(self)

    monkeypatch.setattr(_Delivery, "_settle", counting_settle)
    transport = InMemoryBroker().transport()
    await transport.connect()
    dlq = await _dlq_with(transport, settings, ["malformed", "signature"] * 5)
    assert await purge(transport, dlq, where=DlqFilter(reason=reason)) == (5 if reason else 10)
    assert twice == []
    assert await transport.queue_depth(dlq) == (5 if reason else 0)
    result = await replay(transport, settings.naming.agent_queues("bulk"))
    assert result.replayed == (5 if reason else 0)
    assert twice == []
    assert await transport.queue_depth(dlq) == 0


async def test_replay_reports_progress_while_it_fetches(settings: Settings) -> None:
    transport = InMemoryBroker().transport()
    await transport.connect()
    await _dlq_with(transport, settings, ["signature"] * 20)
    seen: list[tuple[int, int, int]] = []
    result = await replay(
        transport,
        settings.naming.agent_queues("bulk"),
        dry_run=True,
        on_progress=lambda r: seen.append((r.fetched, r.scanned, r.total)),
    )
    assert result.matched == 20
    assert seen[:3] == [(1, 0, 20), (2, 0, 20), (3, 0, 20)]  # counting up before any is scanned
    assert seen[-1] == (20, 20, 20)
    assert len(seen) == 40  # every fetch and every scan, matched or not


async def test_purge_raises_when_the_queue_still_holds_what_it_acked(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    transport = InMemoryBroker().transport()
    await transport.connect()
    dlq = await _dlq_with(transport, settings, ["malformed"] * 4)

    async def ack_lost(self: _Delivery) -> None:  # what a dropped settle looks like afterwards
        await self.nack(requeue=True)

    monkeypatch.setattr(_Delivery, "ack", ack_lost)
    with pytest.raises(PurgeIncompleteError, match="4 of them are still in the queue"):
        await purge(transport, dlq, verify_within_s=0.2)
