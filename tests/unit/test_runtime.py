"""The agent runtime on the in-memory broker: faults, emitted events, dedup, confirms, shutdown."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import structlog

import choreo
from choreo import codec
from choreo.envelope import Envelope, format_timestamp, parse_envelope
from choreo.errors import HeadersNotSendable, PublishNotConfirmed, SignatureInvalid
from choreo.ids import derived_id
from choreo.publisher import new_envelope, to_message
from choreo.runtime import AgentRuntime
from choreo.signing import ALG_HEADER, KID_HEADER, SIG_HEADER, Keyring
from choreo.stores.base import ClaimResult, DedupStore, LeaseStoreMixin
from choreo.testing import wait_for
from choreo.topology import QueueSpec, Topology
from choreo.transport import (
    Delivery,
    DeliveryHandler,
    InMemoryBroker,
    InMemoryTransport,
    OutgoingMessage,
    Subscription,
    Transport,
)
from choreo.transport.base import RAW_PROPERTIES, UNDECODABLE_PROPERTIES

FAULT_HEADERS = (
    "x-choreo-reason",
    "x-choreo-error",
    "x-choreo-agent",
    "x-choreo-attempts",
    "x-choreo-failed-at",
    "x-choreo-original-routing-key",
)
SIGNATURE_HEADERS = (ALG_HEADER, KID_HEADER, SIG_HEADER)
MAX_BODY = 4096


class Ping(choreo.Event, type="t.ping"):
    n: int


class Pong(choreo.Event, type="t.pong"):
    n: int


class Note(choreo.Event, type="t.note"):
    text: str


# fixtures and helpers ---------------------------------------------------------------------------


@pytest.fixture
def broker() -> InMemoryBroker:
    return InMemoryBroker()


@pytest.fixture
async def mem(broker: InMemoryBroker) -> AsyncIterator[InMemoryTransport]:
    transport = broker.transport()
    await transport.connect()
    yield transport
    await transport.close()


@asynccontextmanager
async def running(
    agents: Sequence[choreo.Agent[Any]], settings: choreo.Settings, transport: Transport
) -> AsyncIterator[choreo.Worker]:
    worker = choreo.Worker(agents, settings=settings, transport=transport)
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop()


async def declare_sink(transport: InMemoryTransport, settings: choreo.Settings, *types: str) -> str:
    """A queue that collects every emitted event of ``types`` for inspection."""
    name = f"{settings.naming.queue_prefix}sink"
    await transport.declare(Topology(settings.naming.exchange, (QueueSpec(name, {}, bindings=types),)))
    return name


async def take_all(transport: InMemoryTransport, queue: str) -> list[Delivery]:
    taken: list[Delivery] = []
    while (delivery := await transport.get(queue)) is not None:
        await delivery.ack()
        taken.append(delivery)
    return taken


def envelope_of(delivery: Delivery) -> Envelope:
    return Envelope.model_validate(codec.loads_object(delivery.body))


def ping_agent(name: str, calls: list[int]) -> choreo.Agent[None]:
    """Handles Ping: n == -1 raises, n == -2 returns a non-Event, anything else returns None."""
    agent: choreo.Agent[None] = choreo.Agent(name)

    @agent.on(Ping)
    async def on_ping(event: Ping, ctx: choreo.Context[None]) -> Any:
        calls.append(event.n)
        if event.n == -1:
            raise choreo.Reject("boom from the handler")  # permanent: dead-lettered at once
        if event.n == -2:
            return "not an event"
        return None

    return agent


def signed(
    settings: choreo.Settings, body: bytes, exchange: str | None = None, routing_key: str = "t.ping"
) -> OutgoingMessage:
    return OutgoingMessage(
        exchange=settings.naming.exchange if exchange is None else exchange,
        routing_key=routing_key,
        body=body,
        headers=dict(settings.keyring.sign(body)),
    )


def ping_body(n: int = 1, **fields: Any) -> bytes:
    return new_envelope("t.ping", {"n": n}, source="test", **fields).encode()


# the bad messages -------------------------------------------------------------------------------

BadFactory = Callable[[choreo.Settings, str], OutgoingMessage]


def tampered_body(settings: choreo.Settings, queue: str) -> OutgoingMessage:
    body = ping_body(1)
    message = signed(settings, body)
    message.body = body.replace(b'"n":1', b'"n":2')
    assert message.body != body
    return message


def missing_signature(settings: choreo.Settings, queue: str) -> OutgoingMessage:
    return OutgoingMessage(settings.naming.exchange, "t.ping", ping_body(1), headers={"x-other": "kept"})


def unknown_kid(settings: choreo.Settings, queue: str) -> OutgoingMessage:
    body = ping_body(1)
    return OutgoingMessage(
        settings.naming.exchange, "t.ping", body, headers=dict(Keyring.hmac(("k9", "other")).sign(body))
    )


def wrong_secret(settings: choreo.Settings, queue: str) -> OutgoingMessage:
    body = ping_body(1)
    return OutgoingMessage(
        settings.naming.exchange, "t.ping", body, headers=dict(Keyring.hmac(("k1", "not-the-secret")).sign(body))
    )


def invalid_json(settings: choreo.Settings, queue: str) -> OutgoingMessage:
    return signed(settings, b'{"id": "e-1", "type": ')


def invalid_utf8(settings: choreo.Settings, queue: str) -> OutgoingMessage:
    return signed(settings, ping_body(1).replace(b'"source":"test"', b'"source":"t\xff\xfe"'))


def invalid_utf8_bytes(settings: choreo.Settings, queue: str) -> OutgoingMessage:
    return signed(settings, b"\xff\xfe{}")


def json_array(settings: choreo.Settings, queue: str) -> OutgoingMessage:
    return signed(settings, b'[{"id":"e-1"}]')


def oversized(settings: choreo.Settings, queue: str) -> OutgoingMessage:
    body = new_envelope("t.ping", {"n": 1, "padding": "x" * MAX_BODY}, source="test").encode()
    assert len(body) > MAX_BODY
    return signed(settings, body)


def envelope_missing_field(settings: choreo.Settings, queue: str) -> OutgoingMessage:
    data = new_envelope("t.ping", {"n": 1}, source="test").to_wire()
    del data["trace_id"]
    return signed(settings, codec.dumps(data))


def payload_invalid(settings: choreo.Settings, queue: str) -> OutgoingMessage:
    return signed(settings, new_envelope("t.ping", {"n": "not a number"}, source="test").encode())


def expired(settings: choreo.Settings, queue: str) -> OutgoingMessage:
    envelope = new_envelope(
        "t.ping", {"n": 1}, source="test", issued_at=datetime.now(UTC) - timedelta(hours=1), ttl_ms=60_000
    )
    return to_message(envelope, settings.keyring, settings.naming.exchange)


def unknown_type(settings: choreo.Settings, queue: str) -> OutgoingMessage:
    # Routed to the agent queue directly: the agent is not bound to t.note.
    return signed(settings, new_envelope("t.note", {"text": "hi"}, source="test").encode(), "", queue)


def undecodable_properties(settings: choreo.Settings, queue: str) -> OutgoingMessage:
    # What the RabbitMQ transport hands over for properties it could not decode (a header name
    # in Latin-1, say); the signature itself is fine, but its headers could not be read.
    message = signed(settings, ping_body(1))
    message.headers = {
        UNDECODABLE_PROPERTIES: "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xe9",
        RAW_PROPERTIES: b" \x00\x00\x00\x00\x0c\x04caf\xe9S\x00\x00\x00\x01v",
    }
    return message


def handler_raises(settings: choreo.Settings, queue: str) -> OutgoingMessage:
    return signed(settings, ping_body(-1))


def handler_returns_non_event(settings: choreo.Settings, queue: str) -> OutgoingMessage:
    return signed(settings, ping_body(-2))


@dataclasses.dataclass(frozen=True)
class BadCase:
    factory: BadFactory
    reason: str
    reaches_handler: bool  # the handler runs (and fails) for it
    error_fragment: str  # a part of x-choreo-error

    @property
    def name(self) -> str:
        return self.factory.__name__


BAD_MESSAGES = [
    BadCase(tampered_body, "signature", False, "does not match"),
    BadCase(missing_signature, "signature", False, "not signed"),
    BadCase(unknown_kid, "signature", False, "unknown key id 'k9'"),
    BadCase(wrong_secret, "signature", False, "does not match"),
    BadCase(invalid_json, "malformed", False, "JSON"),
    BadCase(invalid_utf8, "malformed", False, "UTF-8"),
    BadCase(invalid_utf8_bytes, "malformed", False, "UTF-8"),
    BadCase(json_array, "malformed", False, "object"),
    BadCase(oversized, "malformed", False, "exceeds"),
    BadCase(undecodable_properties, "malformed", False, "AMQP properties could not be decoded: UnicodeDecodeError"),
    BadCase(envelope_missing_field, "schema", False, "envelope: trace_id"),
    BadCase(payload_invalid, "schema", False, "payload of t.ping: n:"),
    BadCase(expired, "expired", False, "ttl_ms"),
    BadCase(unknown_type, "unknown_type", False, "t.note"),
    BadCase(handler_raises, "handler_error", True, "boom from the handler"),
    BadCase(handler_returns_non_event, "handler_error", True, "TypeError: handler must return an Event"),
]


def parse_failed_at(value: object) -> datetime:
    assert isinstance(value, str)
    assert value.endswith("Z")
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


# faults -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", BAD_MESSAGES, ids=[case.name for case in BAD_MESSAGES])
async def test_fault_dead_letters_with_headers_and_untouched_body_and_signature(
    mem: InMemoryTransport, settings: choreo.Settings, case: BadCase
) -> None:
    settings = dataclasses.replace(settings, max_body_bytes=MAX_BODY)
    calls: list[int] = []
    agent = ping_agent("faulty", calls)
    queues = settings.naming.agent_queues(agent.name)
    publisher = choreo.Publisher(transport=mem, settings=settings, source="test")

    async with running([agent], settings, mem) as worker:
        stats = worker.runtimes[0].stats
        bad = case.factory(settings, queues.main)
        sent_headers = dict(bad.headers)
        before = datetime.now(UTC) - timedelta(seconds=1)
        await mem.publish(bad)
        await publisher.publish(Ping(n=7))
        await wait_for(lambda: stats.handled == 1, within=5, what="the good message after the bad one")
        await wait_for(lambda: stats.dead_lettered[case.reason] == 1, within=5, what=f"a {case.reason} dead-letter")

    assert calls == ([-1 if case.factory is handler_raises else -2, 7] if case.reaches_handler else [7])
    assert stats.dead_lettered_total == 1
    assert await mem.queue_depth(queues.main) == 0

    dead = await mem.get(queues.dlq)
    assert dead is not None
    assert await mem.get(queues.dlq) is None
    assert dead.body == bad.body
    headers = dead.headers
    for name in SIGNATURE_HEADERS:
        if name in sent_headers:
            assert headers[name] == sent_headers[name]
            assert type(headers[name]) is type(sent_headers[name])
        else:
            assert name not in headers
    for name, value in sent_headers.items():
        assert headers[name] == value
    assert all(name in headers for name in FAULT_HEADERS)
    assert headers["x-choreo-reason"] == case.reason
    assert headers["x-choreo-agent"] == agent.name
    assert headers["x-choreo-attempts"] == 1
    error = headers["x-choreo-error"]
    assert isinstance(error, str)
    assert case.error_fragment in error
    assert before <= parse_failed_at(headers["x-choreo-failed-at"]) <= datetime.now(UTC)
    assert headers["x-choreo-original-routing-key"] == bad.routing_key


async def test_worker_keeps_handling_good_messages_between_all_kinds_of_bad_ones(
    mem: InMemoryTransport, settings: choreo.Settings
) -> None:
    settings = dataclasses.replace(settings, max_body_bytes=MAX_BODY, prefetch=1)
    calls: list[int] = []
    agent = ping_agent("resilient", calls)
    queues = settings.naming.agent_queues(agent.name)
    publisher = choreo.Publisher(transport=mem, settings=settings, source="test")

    async with running([agent], settings, mem) as worker:
        stats = worker.runtimes[0].stats
        for i, case in enumerate(BAD_MESSAGES):
            await mem.publish(case.factory(settings, queues.main))
            await publisher.publish(Ping(n=100 + i))
        await wait_for(lambda: stats.handled == len(BAD_MESSAGES), within=5, what="every good message")
        await wait_for(
            lambda: stats.dead_lettered_total == len(BAD_MESSAGES), within=5, what="every bad message dead-lettered"
        )

    good = [100 + i for i in range(len(BAD_MESSAGES))]
    assert [n for n in calls if n >= 100] == good
    assert sorted(n for n in calls if n < 100) == [-2, -1]
    assert dict(stats.dead_lettered) == collections.Counter(case.reason for case in BAD_MESSAGES)
    assert await mem.queue_depth(queues.dlq) == len(BAD_MESSAGES)
    assert await mem.queue_depth(queues.main) == 0


# emitted events ---------------------------------------------------------------------------------


def assert_emitted_by(
    delivery: Delivery, *, settings: choreo.Settings, agent: str, parent: Envelope, root: Envelope, ordinal: int
) -> Envelope:
    settings.keyring.verify(delivery.body, delivery.headers)  # raises if unsigned or wrong
    emitted = envelope_of(delivery)
    assert emitted.id == derived_id(parent.id, agent, emitted.type, ordinal)
    assert emitted.causation_id == parent.id
    assert emitted.trace_id == root.trace_id
    assert emitted.correlation_id == root.effective_correlation_id
    assert emitted.source == agent
    assert delivery.routing_key == emitted.type
    assert delivery.message_id == emitted.id
    return emitted


async def test_emitted_events_carry_causation_trace_correlation_and_deterministic_signed_ids(
    mem: InMemoryTransport, settings: choreo.Settings
) -> None:
    first: choreo.Agent[None] = choreo.Agent("first")
    second: choreo.Agent[None] = choreo.Agent("second")

    @first.on(Ping)
    async def ping_to_pong(event: Ping, ctx: choreo.Context[None]) -> Pong:
        return Pong(n=event.n + 1)

    @second.on(Pong)
    async def pong_to_note(event: Pong, ctx: choreo.Context[None]) -> Note:
        return Note(text=f"pong {event.n}")

    sink = await declare_sink(mem, settings, "t.pong", "t.note")
    publisher = choreo.Publisher(transport=mem, settings=settings, source="test")
    async with running([first, second], settings, mem) as worker:
        root = await publisher.publish(Ping(n=1))
        saga_root = await publisher.publish(Ping(n=10), correlation_id="saga-42")
        await wait_for(lambda: worker.runtimes[1].stats.handled == 2, within=5, what="both chains to finish")

    assert root.correlation_id is None
    deliveries = await take_all(mem, sink)
    assert len(deliveries) == 4
    by_trace: dict[str, dict[str, Delivery]] = {root.trace_id: {}, saga_root.trace_id: {}}
    for delivery in deliveries:
        env = envelope_of(delivery)
        by_trace[env.trace_id][env.type] = delivery
    for origin in (root, saga_root):
        emitted = by_trace[origin.trace_id]
        pong = assert_emitted_by(
            emitted["t.pong"], settings=settings, agent="first", parent=origin, root=origin, ordinal=0
        )
        note = assert_emitted_by(
            emitted["t.note"], settings=settings, agent="second", parent=pong, root=origin, ordinal=0
        )
        assert note.causation_id == pong.id != origin.id
        assert pong.payload == {"n": origin.payload["n"] + 1}
    assert envelope_of(by_trace[root.trace_id]["t.note"]).correlation_id == root.id
    assert envelope_of(by_trace[saga_root.trace_id]["t.note"]).correlation_id == "saga-42"
    # A different keyring does not accept the emitted signature: it really is the settings' key.
    with pytest.raises(SignatureInvalid):
        Keyring.hmac(("k1", "someone-else")).verify(deliveries[0].body, deliveries[0].headers)


class Expiring(choreo.Event, type="t.expiring", ttl_ms=30_000):
    text: str


@pytest.mark.parametrize("correlation_id", [None, "saga-7"])
async def test_emitted_messages_are_what_to_message_makes_of_their_own_envelopes(
    mem: InMemoryTransport, settings: choreo.Settings, correlation_id: str | None
) -> None:
    """Emitted events are encoded from their parts, without an Envelope: each must be a valid
    v1 envelope and, message for message, what to_message makes of it (body bytes, signature,
    properties, expiration), so both ways of publishing put the same thing on the wire."""
    agent: choreo.Agent[None] = choreo.Agent("emitter")
    runtime = AgentRuntime(agent, mem, settings)
    parent = new_envelope("t.ping", {"n": 1}, source="test", correlation_id=correlation_id)
    result = [Pong(n=2), Expiring(text="caf\u00e9 \U0001f600"), Pong(n=3)]
    messages = runtime._emitted_messages(parent, result)
    assert [m.routing_key for m in messages] == ["t.pong", "t.expiring", "t.pong"]
    for message, ordinal in zip(messages, (0, 0, 1), strict=True):
        envelope = parse_envelope(message.body)  # validates: a well-formed v1 envelope
        assert envelope.id == derived_id(parent.id, "emitter", envelope.type, ordinal)
        assert (envelope.source, envelope.causation_id, envelope.trace_id, envelope.dedup_key) == (
            "emitter",
            parent.id,
            parent.trace_id,
            None,
        )
        assert envelope.correlation_id == (correlation_id or parent.id)
        assert envelope.ttl_ms == (30_000 if envelope.type == "t.expiring" else None)
        assert abs(envelope.issued_at - datetime.now(UTC)) < timedelta(seconds=60)
        expected = to_message(
            envelope, settings.keyring, settings.naming.exchange, expiration_slack_ms=settings.clock_skew_ms
        )
        assert message.body == expected.body
        assert {k: v for k, v in message.headers.items() if k != "traceparent"} == {
            k: v for k, v in expected.headers.items() if k != "traceparent"
        }
        assert str(message.headers["traceparent"]).split("-")[1] == parent.trace_id
        assert dataclasses.replace(message, headers={}) == dataclasses.replace(expected, headers={})
    assert [parse_envelope(m.body).payload for m in messages] == [
        {"n": 2},
        {"text": "caf\u00e9 \U0001f600"},
        {"n": 3},
    ]
    assert messages[1].expiration_ms == 30_000 + settings.clock_skew_ms
    assert messages[0].expiration_ms is None
    assert messages[0].correlation_id == (correlation_id or parent.id)


async def test_a_handler_returning_a_list_emits_all_with_ordinals_per_type(
    mem: InMemoryTransport, settings: choreo.Settings
) -> None:
    agent: choreo.Agent[None] = choreo.Agent("fanout")

    @agent.on(Ping)
    async def fan_out(event: Ping, ctx: choreo.Context[None]) -> list[choreo.Event]:
        return [Pong(n=0), Note(text="a"), Pong(n=1), Pong(n=2), Note(text="b")]

    sink = await declare_sink(mem, settings, "t.pong", "t.note")
    publisher = choreo.Publisher(transport=mem, settings=settings, source="test")
    async with running([agent], settings, mem) as worker:
        root = await publisher.publish(Ping(n=1))
        await wait_for(lambda: worker.runtimes[0].stats.handled == 1, within=5, what="the fan-out")
        assert worker.runtimes[0].stats.emitted == 5

    deliveries = await take_all(mem, sink)
    assert len(deliveries) == 5
    pongs = {envelope_of(d).payload["n"]: d for d in deliveries if d.routing_key == "t.pong"}
    notes = {envelope_of(d).payload["text"]: d for d in deliveries if d.routing_key == "t.note"}
    assert sorted(pongs) == [0, 1, 2]
    assert sorted(notes) == ["a", "b"]
    for ordinal, n in enumerate([0, 1, 2]):
        assert_emitted_by(pongs[n], settings=settings, agent="fanout", parent=root, root=root, ordinal=ordinal)
    for ordinal, text in enumerate(["a", "b"]):
        assert_emitted_by(notes[text], settings=settings, agent="fanout", parent=root, root=root, ordinal=ordinal)
    assert len({envelope_of(d).id for d in deliveries}) == 5


# dedup ------------------------------------------------------------------------------------------


async def test_the_same_envelope_twice_runs_the_handler_once(mem: InMemoryTransport, settings: choreo.Settings) -> None:
    calls: list[int] = []
    agent = ping_agent("dedup", calls)
    publisher = choreo.Publisher(transport=mem, settings=settings, source="test")
    envelope = new_envelope("t.ping", {"n": 5}, source="test")

    async with running([agent], settings, mem) as worker:
        stats = worker.runtimes[0].stats
        await publisher.publish_envelope(envelope)
        await wait_for(lambda: stats.handled == 1, within=5, what="the first copy")
        await publisher.publish_envelope(envelope)
        await wait_for(lambda: stats.duplicates == 1, within=5, what="the second copy to be suppressed")

    assert calls == [5]
    assert (stats.received, stats.handled, stats.duplicates) == (2, 1, 1)
    assert await mem.queue_depth(settings.naming.agent_queues("dedup").main) == 0


async def test_concurrent_copies_of_one_envelope_run_the_handler_once(
    mem: InMemoryTransport, settings: choreo.Settings
) -> None:
    gate = asyncio.Event()
    calls: list[str] = []
    agent: choreo.Agent[None] = choreo.Agent("dedup-concurrent")

    @agent.on(Ping)
    async def slow(event: Ping, ctx: choreo.Context[None]) -> None:
        calls.append(ctx.event_id)
        await gate.wait()

    publisher = choreo.Publisher(transport=mem, settings=settings, source="test")
    envelope = new_envelope("t.ping", {"n": 5}, source="test")
    async with running([agent], settings, mem) as worker:
        runtime = worker.runtimes[0]
        await publisher.publish_envelope(envelope)
        await publisher.publish_envelope(envelope)
        try:
            await wait_for(lambda: runtime.in_flight == 2 and len(calls) == 1, within=5, what="both copies in flight")
        finally:
            gate.set()
        await wait_for(lambda: runtime.in_flight == 0, within=5, what="both copies settled")

    assert calls == [envelope.id]
    assert (runtime.stats.handled, runtime.stats.duplicates) == (1, 1)


async def test_different_ids_with_one_dedup_key_run_the_handler_once(
    mem: InMemoryTransport, settings: choreo.Settings
) -> None:
    calls: list[int] = []
    agent = ping_agent("dedup-key", calls)
    publisher = choreo.Publisher(transport=mem, settings=settings, source="test")

    async with running([agent], settings, mem) as worker:
        stats = worker.runtimes[0].stats
        first = await publisher.publish(Ping(n=1), dedup_key="order-o-1")
        await wait_for(lambda: stats.handled == 1, within=5, what="the first event")
        second = await publisher.publish(Ping(n=2), dedup_key="order-o-1")
        await publisher.publish(Ping(n=3), dedup_key="order-o-2")
        await wait_for(lambda: stats.received == 3 and stats.handled == 2, within=5, what="the other events")

    assert first.id != second.id
    assert calls == [1, 3]
    assert stats.duplicates == 1


# ack only after confirm -------------------------------------------------------------------------


class SettleRecordingDelivery:
    def __init__(self, inner: Delivery, log: list[tuple[str, bytes, bool]]) -> None:
        self._inner = inner
        self._log = log

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def ack(self) -> None:
        self._log.append(("ack", self._inner.body, self._inner.redelivered))
        await self._inner.ack()

    async def nack(self, *, requeue: bool) -> None:
        self._log.append((f"nack(requeue={requeue})", self._inner.body, self._inner.redelivered))
        await self._inner.nack(requeue=requeue)


class FlakyTransport(InMemoryTransport):
    """The first ``publish_many`` is not confirmed; settlements of subscribed deliveries are logged."""

    def __init__(self, broker: InMemoryBroker) -> None:
        super().__init__(broker)
        self.failed_batches: list[list[OutgoingMessage]] = []
        self.settlements: list[tuple[str, bytes, bool]] = []

    async def publish_many(self, messages: Sequence[OutgoingMessage]) -> None:
        if not self.failed_batches:
            self.failed_batches.append(list(messages))
            raise PublishNotConfirmed("simulated: the broker did not confirm")
        await super().publish_many(messages)

    async def subscribe(self, queue: str, handler: DeliveryHandler, *, prefetch: int) -> Subscription:
        async def recording(delivery: Delivery) -> None:
            await handler(SettleRecordingDelivery(delivery, self.settlements))

        return await super().subscribe(queue, recording, prefetch=prefetch)


class RecordingDedup(LeaseStoreMixin):
    def __init__(self, inner: DedupStore, log: list[tuple[str, str, str]]) -> None:
        self._inner = inner
        self._log = log

    async def open(self) -> None:
        await self._inner.open()

    async def close(self) -> None:
        await self._inner.close()

    async def claim(self, agent: str, key: str, *, lease_s: float) -> ClaimResult:
        result = await self._inner.claim(agent, key, lease_s=lease_s)
        self._log.append(("claim", key, result))
        return result

    async def complete(self, agent: str, key: str) -> None:
        self._log.append(("complete", key, ""))
        await self._inner.complete(agent, key)

    async def release(self, agent: str, key: str) -> None:
        self._log.append(("release", key, ""))
        await self._inner.release(agent, key)

    async def cleanup(self, *, older_than_s: float) -> int:
        return await self._inner.cleanup(older_than_s=older_than_s)


async def test_unconfirmed_emits_leave_the_message_unacked_and_the_rerun_emits_the_same_ids(
    broker: InMemoryBroker, mem: InMemoryTransport, settings: choreo.Settings
) -> None:
    flaky = FlakyTransport(broker)
    await flaky.connect()
    calls: list[int] = []
    agent: choreo.Agent[None] = choreo.Agent("confirming")

    @agent.on(Ping)
    async def emit_two(event: Ping, ctx: choreo.Context[None]) -> list[choreo.Event]:
        calls.append(event.n)
        return [Pong(n=event.n), Note(text="side")]

    sink = await declare_sink(mem, settings, "t.pong", "t.note")
    publisher = choreo.Publisher(transport=mem, settings=settings, source="test")
    dedup_log: list[tuple[str, str, str]] = []
    worker = choreo.Worker([agent], settings=settings, transport=flaky)
    runtime = worker.runtimes[0]
    runtime.dedup = RecordingDedup(runtime.dedup, dedup_log)
    await worker.start()
    try:
        root = await publisher.publish(Ping(n=3))
        await wait_for(lambda: runtime.stats.handled == 1, within=5, what="the successful re-run")
    finally:
        await worker.stop()
        await flaky.close()

    assert calls == [3, 3]
    assert runtime.stats.requeued == 1
    assert runtime.stats.duplicates == 0
    body = root.encode()
    assert flaky.settlements == [("nack(requeue=True)", body, False), ("ack", body, True)]
    # Nothing was marked done after the unconfirmed attempt: released, claimed again, then done.
    assert dedup_log == [
        ("claim", root.id, "claimed"),
        ("release", root.id, ""),
        ("claim", root.id, "claimed"),
        ("complete", root.id, ""),
    ]
    first_ids = sorted(m.message_id or "" for m in flaky.failed_batches[0])
    emitted = await take_all(mem, sink)
    assert sorted(envelope_of(d).id for d in emitted) == first_ids
    assert first_ids == sorted(
        [derived_id(root.id, "confirming", "t.pong", 0), derived_id(root.id, "confirming", "t.note", 0)]
    )
    assert await mem.queue_depth(settings.naming.agent_queues("confirming").main) == 0


# graceful stop ----------------------------------------------------------------------------------


async def test_stop_waits_for_the_in_flight_handler_and_acks_its_message(
    broker: InMemoryBroker, mem: InMemoryTransport, settings: choreo.Settings
) -> None:
    worker_conn = broker.transport()
    await worker_conn.connect()
    gate = asyncio.Event()
    started: list[int] = []
    finished: list[int] = []
    agent: choreo.Agent[None] = choreo.Agent("graceful")

    @agent.on(Ping)
    async def slow(event: Ping, ctx: choreo.Context[None]) -> None:
        started.append(event.n)
        await gate.wait()
        finished.append(event.n)

    publisher = choreo.Publisher(transport=mem, settings=settings, source="test")
    queue = settings.naming.agent_queues(agent.name).main
    worker = choreo.Worker([agent], settings=settings, transport=worker_conn)
    runtime = worker.runtimes[0]
    await worker.start()
    try:
        await publisher.publish(Ping(n=1))
        await wait_for(lambda: started == [1], within=5, what="the handler to start")

        stopping = asyncio.create_task(worker.stop())
        await wait_for(lambda: _not(runtime.is_attached()), within=5, what="the consumer to be cancelled")
        # Stop is now waiting for the handler; new messages are no longer consumed.
        await publisher.publish(Ping(n=2))
        assert not stopping.done()
        assert runtime.in_flight == 1
        assert await mem.queue_depth(queue) == 1

        async def release() -> None:
            gate.set()

        releaser = asyncio.create_task(release())
        assert await asyncio.wait_for(stopping, timeout=5) is True
        assert releaser.done()
    finally:
        gate.set()
    assert finished == [1]
    assert runtime.stats.handled == 1

    # Closing the worker's connection returns unacked deliveries; the handled one was acked.
    await worker_conn.close()
    await broker.drain()
    assert await mem.queue_depth(queue) == 1
    left = await mem.get(queue)
    assert left is not None
    assert envelope_of(left).payload == {"n": 2}
    assert left.redelivered is False


async def test_a_handler_still_running_when_the_grace_period_ends_is_cancelled_and_settles_nothing(
    broker: InMemoryBroker, mem: InMemoryTransport, settings: choreo.Settings
) -> None:
    worker_conn = broker.transport()
    await worker_conn.connect()
    started, cancelled = asyncio.Event(), asyncio.Event()
    agent: choreo.Agent[None] = choreo.Agent("abandoning", retry=choreo.RetryPolicy(attempts=1, delayed=0))

    @agent.on(Ping)
    async def stuck(event: Ping, ctx: choreo.Context[None]) -> Pong:
        started.set()
        try:
            await asyncio.Event().wait()  # never ends by itself
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return Pong(n=event.n)

    publisher = choreo.Publisher(transport=mem, settings=settings, source="test")
    queues = settings.naming.agent_queues(agent.name)
    worker = choreo.Worker([agent], settings=dataclasses.replace(settings, shutdown_grace_s=0.2), transport=worker_conn)
    runtime = worker.runtimes[0]
    await worker.start()
    await publisher.publish(Ping(n=1))
    await asyncio.wait_for(started.wait(), 5)
    assert await asyncio.wait_for(worker.stop(), 5) is False
    assert cancelled.is_set()  # cancelled before stop() returned, not left running
    assert runtime.in_flight == 0
    stats = runtime.stats
    assert (stats.handled, stats.emitted, stats.dead_lettered_total, stats.requeued) == (0, 0, 0, 0)
    assert await mem.queue_depth(queues.dlq) == 0
    # Unsettled, it is back in its queue as stop() returns, though the connection stays open.
    assert worker_conn.connected
    assert await mem.queue_depth(queues.main) == 1
    await worker_conn.close()
    # Its claim was released: the next worker handles it at once, not a lease (30 s) later.
    handled: list[int] = []
    again: choreo.Agent[None] = choreo.Agent("abandoning")

    @again.on(Ping)
    async def fine(event: Ping, ctx: choreo.Context[None]) -> None:
        handled.append(event.n)

    next_conn = broker.transport()
    await next_conn.connect()
    successor = choreo.Worker([again], settings=settings, transport=next_conn)
    await successor.start()
    try:
        await wait_for(lambda: handled == [1], within=5, what="the successor to handle it")
    finally:
        await successor.stop()
        await next_conn.close()


async def _not(result: Awaitable[bool]) -> bool:
    return not await result


async def lose_acks(
    broker: InMemoryBroker, mem: InMemoryTransport, settings: choreo.Settings
) -> tuple[choreo.Worker, list[str]]:
    """A started worker whose five in-flight handlers finish after their connection closed:
    their five acks fail. Returns the worker (running) and the five event ids."""
    worker_conn = broker.transport()
    await worker_conn.connect()
    gate = asyncio.Event()
    started: list[int] = []
    agent: choreo.Agent[None] = choreo.Agent("lossy")

    @agent.on(Ping)
    async def held(event: Ping, ctx: choreo.Context[None]) -> None:
        started.append(event.n)
        await gate.wait()

    publisher = choreo.Publisher(transport=mem, settings=settings, source="test")
    worker = choreo.Worker([agent], settings=settings, transport=worker_conn)
    await worker.start()
    ids = [(await publisher.publish(Ping(n=n))).id for n in range(5)]
    await wait_for(lambda: len(started) == 5, within=5, what="five handlers to start")
    broker.close_connection(worker_conn)  # the five deliveries go back to the queue
    gate.set()
    await wait_for(lambda: worker.runtimes[0].stats.settle_failed == 5, within=5, what="five failed acks")
    return worker, ids


def settle_lines(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if "settle" in e["event"]]


FIRST = "settle failed; the broker redelivers the message"
SUMMARY = "more settles failed with the channel; the broker redelivers those messages"


async def test_acks_lost_with_the_connection_log_one_line_then_one_summary(
    broker: InMemoryBroker, mem: InMemoryTransport, settings: choreo.Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("choreo.runtime._SETTLE_REPORT_S", 0.5)
    with structlog.testing.capture_logs() as logs:
        worker, ids = await lose_acks(broker, mem, settings)
        try:
            await wait_for(lambda: len(settle_lines(logs)) == 2, within=5, what="the summary")
        finally:
            await worker.stop()
    first, summary = settle_lines(logs)
    assert [first["event"], summary["event"]] == [FIRST, SUMMARY]
    assert first["log_level"] == summary["log_level"] == "warning"
    assert first["agent"] == summary["agent"] == "lossy"
    assert summary["count"] == 4
    assert sorted([first["event_id"], *summary["event_ids"]]) == sorted(ids)
    assert logs[-1]["event"] == "agent stopped"
    assert logs[-1]["settle_failed"] == 5
    queue = settings.naming.agent_queues("lossy").main
    assert await mem.queue_depth(queue) == 5  # nothing lost: all five wait for redelivery


async def test_stopping_inside_the_window_logs_the_summary_before_agent_stopped(
    broker: InMemoryBroker, mem: InMemoryTransport, settings: choreo.Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("choreo.runtime._SETTLE_REPORT_S", 3600)  # only stop() can report them
    with structlog.testing.capture_logs() as logs:
        worker, _ = await lose_acks(broker, mem, settings)
        assert [e["event"] for e in settle_lines(logs)] == [FIRST]
        await worker.stop()
    events = [e["event"] for e in logs]
    assert events.index(SUMMARY) < events.index("agent stopped")
    assert settle_lines(logs)[1]["count"] == 4
    runtime = worker.runtimes[0]
    assert runtime._settle_report is None  # the timer is gone with the agent


class FrameLimited(InMemoryTransport):
    """The in-memory broker with RabbitMQ's one limit that matters here: a message whose headers
    take more than ``limit`` bytes is refused before it is sent (:class:`HeadersNotSendable`)."""

    limit = 2048
    refused: int = 0

    async def publish(self, message: OutgoingMessage) -> None:
        if sum(len(k) + len(str(v)) for k, v in message.headers.items()) > self.limit:
            self.refused += 1
            raise HeadersNotSendable(f"{message.routing_key!r} not sent: headers too large")
        await super().publish(message)


async def test_a_dead_letter_whose_headers_no_longer_fit_moves_with_the_essential_ones(
    broker: InMemoryBroker, settings: choreo.Settings
) -> None:
    """A message near the limit, plus the fault headers, cannot be moved whole. Requeued, it would
    come back and fail again for ever; moved with its signature, trace and fault headers, and the
    names of the others, it can still be inspected and replayed."""
    transport = FrameLimited(broker)
    await transport.connect()
    calls: list[int] = []
    agent = ping_agent("limited", calls)
    queues = settings.naming.agent_queues(agent.name)
    body = ping_body(-1)  # the handler rejects it: dead-lettered at once
    message = signed(settings, body)
    message.headers |= {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01", "x-bulky": "b" * 1900}
    sent = dict(message.headers)
    try:
        async with running([agent], settings, transport) as worker:
            stats = worker.runtimes[0].stats
            await InMemoryTransport.publish(transport, message)  # in past the limit, as the broker takes it
            await wait_for(lambda: stats.dead_lettered["handler_error"] == 1, within=5, what="the dead-letter")
        assert transport.refused == 1, "the whole move was tried first"
        dead = await transport.get(queues.dlq)
        assert dead is not None
        assert dead.body == body
        assert await transport.queue_depth(queues.main) == 0
        for name in (*SIGNATURE_HEADERS, "traceparent"):
            assert dead.headers[name] == sent[name]
        assert all(name in dead.headers for name in FAULT_HEADERS)
        assert "x-bulky" not in dead.headers
        assert dead.headers["x-choreo-dropped-headers"] == "x-bulky"
    finally:
        await transport.close()


def hand_signed(settings: choreo.Settings, **fields: Any) -> OutgoingMessage:
    """A t.ping built field by field, as a producer in another language would."""
    data = {
        "id": f"e-{fields.get('issued_at', 'x')}-{fields.get('ttl_ms')}",
        "type": "t.ping",
        "source": "elsewhere",
        "issued_at": "2026-11-21T10:00:00Z",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "payload": {"n": 1},
    }
    data.update(fields)
    return signed(settings, codec.dumps(data))


async def test_ttls_and_timestamps_at_the_edges_of_the_calendar_are_judged_not_crashed_on(
    mem: InMemoryTransport, settings: choreo.Settings
) -> None:
    """Their deadline is past year 9999 (never stale) or their time cannot be shown in UTC:
    each once raised out of the TTL check and looped through requeues into retries_exhausted."""
    calls: list[int] = []
    agent = ping_agent("calendar", calls)
    async with running([agent], settings, mem) as worker:
        stats = worker.runtimes[0].stats
        now = format_timestamp(datetime.now(UTC))
        for message in (
            hand_signed(settings, issued_at=now, ttl_ms=10**18),
            hand_signed(settings, issued_at=now, ttl_ms=10**15),
            hand_signed(settings, issued_at="9999-12-31T23:59:59Z", ttl_ms=60_000),
            hand_signed(settings, issued_at="0001-01-01T00:30:00+01:00", ttl_ms=1000),
        ):
            await mem.publish(message)
        await wait_for(lambda: stats.handled == 3, within=5, what="the three events that never go stale")
        await wait_for(lambda: stats.dead_lettered["expired"] == 1, within=5, what="the year-1 event, expired")
    assert stats.dead_lettered_total == 1
    dead = await mem.get(settings.naming.agent_queues("calendar").dlq)
    assert dead is not None
    assert "0001-01-01" in str(dead.headers["x-choreo-error"])


async def test_a_cancelled_error_let_through_by_a_handler_is_a_handler_failure(
    mem: InMemoryTransport, settings: choreo.Settings
) -> None:
    """A future the handler awaits, cancelled by someone else: its CancelledError once escaped
    the pipeline and left the message unsettled (with prefetch 1, nothing else came)."""
    settings = dataclasses.replace(settings, prefetch=1)
    agent: choreo.Agent[None] = choreo.Agent("cancelled")
    handled: list[int] = []

    @agent.on(Ping, retry=choreo.RetryPolicy(attempts=1))
    async def on_ping(event: Ping, ctx: choreo.Context[None]) -> None:
        if event.n == 1:
            shared: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            shared.cancel()
            await shared
        handled.append(event.n)

    publisher = choreo.Publisher(transport=mem, settings=settings, source="test")
    async with running([agent], settings, mem) as worker:
        stats = worker.runtimes[0].stats
        await publisher.publish(Ping(n=1))
        await publisher.publish(Ping(n=2))
        # With prefetch 1, the next message comes only once the first is settled.
        await wait_for(lambda: handled == [2], within=5, what="the next message")
        assert stats.failed >= 1
        assert stats.retried_delayed >= 1  # a failure like any other: off to the delayed retries


async def test_attempt_counts_from_headers_are_clamped_before_they_go_back_out(
    mem: InMemoryTransport, settings: choreo.Settings
) -> None:
    """Headers are not signed: an x-choreo-attempts of 2**63 - 1, plus one, has no AMQP
    encoding, and raised out of the dead-letter move on RabbitMQ."""
    calls: list[int] = []
    agent = ping_agent("counted", calls)
    message = signed(settings, ping_body(-1))
    message.headers["x-choreo-attempts"] = 2**63 - 1
    async with running([agent], settings, mem) as worker:
        await mem.publish(message)
        stats = worker.runtimes[0].stats
        await wait_for(lambda: stats.dead_lettered["handler_error"] == 1, within=5, what="the dead-letter")
    dead = await mem.get(settings.naming.agent_queues("counted").dlq)
    assert dead is not None
    assert dead.headers["x-choreo-attempts"] == 2**31


def test_ids_past_255_bytes_stay_in_the_body_but_not_in_the_amqp_properties(settings: choreo.Settings) -> None:
    long_id = "\U0001f600" * 128  # valid in the body (128 characters), 512 bytes in UTF-8
    envelope = new_envelope("t.ping", {"n": 1}, source="test", id=long_id)
    message = to_message(envelope, settings.keyring, settings.naming.exchange)
    assert message.message_id is None
    assert message.correlation_id is None
    assert envelope_of_body(message.body).id == long_id
    short = to_message(new_envelope("t.ping", {"n": 1}, source="test", id="e-1"), settings.keyring, "x")
    assert (short.message_id, short.correlation_id) == ("e-1", "e-1")


def envelope_of_body(body: bytes) -> Envelope:
    return Envelope.model_validate(codec.loads_object(body))
