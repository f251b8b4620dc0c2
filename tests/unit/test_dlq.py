"""DLQ operations on the in-memory broker: a replay that fails again comes back counted."""

from __future__ import annotations

from choreo import Agent, Context, Event, Keyring, Settings, Worker
from choreo.dlq import DlqFilter, peek, replay
from choreo.publisher import new_envelope, to_message
from choreo.testing import wait_for
from choreo.transport import InMemoryBroker


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
