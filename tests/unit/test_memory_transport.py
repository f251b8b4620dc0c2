"""The in-memory broker: RabbitMQ's semantics for what choreo relies on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from choreo.errors import PublishNotConfirmed, TopologyError, TransportError
from choreo.testing import wait_for
from choreo.topology import QueueSpec, Topology, agent_topology
from choreo.transport.base import Delivery, OutgoingMessage
from choreo.transport.memory import InMemoryBroker, InMemoryTransport, topic_matches

EXCHANGE = "test.events"
DLQ_ARGS: dict[str, Any] = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "work.dlq"}


async def wait_until(predicate: Callable[[], object], seconds: float = 2.0) -> None:
    """Poll ``predicate`` (sync, or returning an awaitable) until it is truthy; fail after ``seconds``."""
    await wait_for(predicate, within=seconds)


async def wait_for_clock(deadline: float) -> None:
    """Wait until ``time.monotonic()`` (the broker's clock) has passed ``deadline``."""
    await wait_until(lambda: time.monotonic() > deadline)


class Recorder:
    """A handler that records deliveries and settles them as told."""

    def __init__(self, settle: str = "ack") -> None:
        self.settle = settle
        self.deliveries: list[Delivery] = []
        self.redelivered: list[bool] = []  # as seen while handling (the flag of the delivery frame)

    @property
    def bodies(self) -> list[bytes]:
        return [d.body for d in self.deliveries]

    async def __call__(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)
        self.redelivered.append(delivery.redelivered)
        if self.settle == "ack":
            await delivery.ack()
        elif self.settle == "requeue":
            await delivery.nack(requeue=True)
        elif self.settle == "reject":
            await delivery.nack(requeue=False)
        # "hold": never settled


@pytest.fixture
def broker() -> InMemoryBroker:
    return InMemoryBroker()


@pytest.fixture
async def transport(broker: InMemoryBroker) -> AsyncIterator[InMemoryTransport]:
    async with broker.transport() as connection:
        yield connection
    async with asyncio.timeout(5):  # a handler stuck after a failed test errors here instead of hanging
        await broker.drain()


async def declare(transport: InMemoryTransport, *queues: QueueSpec) -> None:
    await transport.declare(Topology(EXCHANGE, queues))


def to_queue(queue: str, body: bytes, **kwargs: Any) -> OutgoingMessage:
    """A message for the default exchange: routing key = queue name."""
    return OutgoingMessage(exchange="", routing_key=queue, body=body, **kwargs)


def event(routing_key: str, body: bytes, **kwargs: Any) -> OutgoingMessage:
    return OutgoingMessage(exchange=EXCHANGE, routing_key=routing_key, body=body, **kwargs)


def death(delivery: Delivery) -> dict[str, Any]:
    deaths = delivery.headers.get("x-death")
    assert isinstance(deaths, list)
    assert deaths
    first = deaths[0]
    assert isinstance(first, dict)
    return first


# topic matching ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        ("order.placed", "order.placed", True),
        ("order.placed", "order.cancelled", False),
        ("order.placed", "order.placed.eu", False),
        ("order.placed", "order", False),
        # '*' is exactly one word
        ("order.*", "order.placed", True),
        ("order.*", "order", False),
        ("order.*", "order.placed.eu", False),
        ("*.placed", "order.placed", True),
        ("*.placed", "placed", False),
        ("*.placed", "a.b.placed", False),
        ("a.*.c", "a.b.c", True),
        ("a.*.c", "a.c", False),
        ("a.*.c", "a.b.b.c", False),
        ("a.*.c", "a.b.d", False),
        ("*", "order", True),
        ("*", "order.placed", False),
        ("*.*", "order.placed", True),
        ("*.*", "order", False),
        # '#' is zero or more words
        ("order.#", "order", True),
        ("order.#", "order.a", True),
        ("order.#", "order.a.b", True),
        ("order.#", "orders.a", False),
        ("order.#", "x.order.a", False),
        ("#.placed", "placed", True),
        ("#.placed", "a.placed", True),
        ("#.placed", "a.b.placed", True),
        ("#.placed", "a.placed.x", False),
        ("#", "order", True),
        ("#", "order.placed.eu", True),
        ("a.#.c", "a.c", True),
        ("a.#.c", "a.b.c", True),
        ("a.#.c", "a.b.d.c", True),
        ("a.#.c", "a.b.d", False),
        ("#.#", "a.b", True),
        ("*.#", "a", True),
        ("*.#", "a.b.c", True),
        ("#.*", "a", True),
        ("*.*.#", "a", False),
        ("a.#.*", "a", False),
        ("a.#.*", "a.b", True),
        # words are compared whole, case-sensitively
        ("order.placed", "Order.placed", False),
        ("ord*.placed", "order.placed", False),
    ],
)
def test_topic_matches(pattern: str, key: str, expected: bool) -> None:
    assert topic_matches(pattern, key) is expected


# publish / subscribe / ack -------------------------------------------------------------------


async def test_publish_routes_by_topic_binding(transport: InMemoryTransport) -> None:
    await declare(
        transport,
        QueueSpec("orders", {}, ("order.*",)),
        QueueSpec("all", {}, ("#",)),
        QueueSpec("placed", {}, ("*.placed",)),
        QueueSpec("other", {}, ("payment.captured",)),
    )
    await transport.publish(event("order.placed", b"1"))
    await transport.publish(event("order.cancelled", b"2"))
    await transport.publish(event("shipment.placed", b"3"))
    assert await transport.queue_depth("orders") == 2
    assert await transport.queue_depth("all") == 3
    assert await transport.queue_depth("placed") == 2
    assert await transport.queue_depth("other") == 0


async def test_overlapping_bindings_deliver_one_copy_per_queue(transport: InMemoryTransport) -> None:
    await declare(transport, QueueSpec("q", {}, ("order.placed", "order.*", "#")))
    await transport.publish(event("order.placed", b"once"))
    assert await transport.queue_depth("q") == 1


async def test_subscribe_delivers_and_ack_removes(transport: InMemoryTransport) -> None:
    await declare(transport, QueueSpec("q", {}, ("order.placed",)))
    recorder = Recorder("ack")
    subscription = await transport.subscribe("q", recorder, prefetch=10)
    assert subscription.queue == "q"
    assert await subscription.is_attached()
    headers: dict[str, str | int | float | bool | bytes | None] = {"x-choreo-kid": "k1", "x-count": 3}
    await transport.publish(event("order.placed", b"body-1", headers=headers, message_id="m-1"))
    await wait_until(lambda: len(recorder.deliveries) == 1)
    delivery = recorder.deliveries[0]
    assert delivery.body == b"body-1"
    assert delivery.routing_key == "order.placed"
    assert delivery.exchange == EXCHANGE
    assert delivery.message_id == "m-1"
    assert delivery.redelivered is False
    assert dict(delivery.headers) == headers
    assert await transport.queue_depth("q") == 0
    with pytest.raises(TransportError, match="already settled"):
        await delivery.ack()


async def test_messages_published_before_subscribe_are_delivered_in_order(transport: InMemoryTransport) -> None:
    await declare(transport, QueueSpec("q", {}))
    for i in range(5):
        await transport.publish(to_queue("q", f"m{i}".encode()))
    assert await transport.queue_depth("q") == 5
    recorder = Recorder("ack")
    await transport.subscribe("q", recorder, prefetch=1)
    await wait_until(lambda: len(recorder.deliveries) == 5)
    assert recorder.bodies == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    assert await transport.queue_depth("q") == 0


async def test_cancelled_subscription_receives_nothing_new(transport: InMemoryTransport) -> None:
    await declare(transport, QueueSpec("q", {}))
    recorder = Recorder("ack")
    subscription = await transport.subscribe("q", recorder, prefetch=1)
    await transport.publish(to_queue("q", b"before"))
    await wait_until(lambda: len(recorder.deliveries) == 1)
    await subscription.cancel()
    assert not await subscription.is_attached()
    await transport.publish(to_queue("q", b"after"))
    assert await transport.queue_depth("q") == 1
    assert recorder.bodies == [b"before"]


async def test_prefetch_limits_unsettled_deliveries(transport: InMemoryTransport) -> None:
    await declare(transport, QueueSpec("q", {}))
    release = asyncio.Event()
    in_flight = 0
    max_in_flight = 0
    done: list[bytes] = []

    async def handler(delivery: Delivery) -> None:
        nonlocal in_flight, max_in_flight
        in_flight += 1
        max_in_flight = max(max_in_flight, in_flight)
        await release.wait()
        in_flight -= 1
        done.append(delivery.body)
        await delivery.ack()

    await transport.subscribe("q", handler, prefetch=3)
    try:
        for i in range(10):
            await transport.publish(to_queue("q", f"m{i}".encode()))
        await wait_until(lambda: in_flight >= 3)
        # The prefetch window is full: the rest waits in the queue.
        assert max_in_flight == 3
        assert await transport.queue_depth("q") == 7
    finally:
        release.set()  # never leave handlers blocked, even when an assertion failed
    await wait_until(lambda: len(done) == 10)
    assert max_in_flight == 3
    assert sorted(done) == sorted(f"m{i}".encode() for i in range(10))
    assert await transport.queue_depth("q") == 0


async def test_a_settled_delivery_frees_one_prefetch_slot(transport: InMemoryTransport) -> None:
    await declare(transport, QueueSpec("q", {}))
    recorder = Recorder("hold")
    await transport.subscribe("q", recorder, prefetch=2)
    for i in range(4):
        await transport.publish(to_queue("q", f"m{i}".encode()))
    await wait_until(lambda: len(recorder.deliveries) == 2)
    assert await transport.queue_depth("q") == 2
    await recorder.deliveries[0].ack()
    await wait_until(lambda: len(recorder.deliveries) == 3)
    assert recorder.bodies == [b"m0", b"m1", b"m2"]
    assert await transport.queue_depth("q") == 1


# nack, redelivery and dead-lettering ---------------------------------------------------------


async def test_nack_requeue_redelivers_with_redelivered_flag(transport: InMemoryTransport) -> None:
    await declare(transport, QueueSpec("q", {}))
    seen: list[tuple[bytes, bool]] = []

    async def handler(delivery: Delivery) -> None:
        seen.append((delivery.body, delivery.redelivered))
        if len(seen) == 1:
            await delivery.nack(requeue=True)
        else:
            await delivery.ack()

    await transport.subscribe("q", handler, prefetch=1)
    await transport.publish(to_queue("q", b"again"))
    await wait_until(lambda: len(seen) == 2)
    assert seen == [(b"again", False), (b"again", True)]
    assert await transport.queue_depth("q") == 0


async def test_redelivered_flag_of_a_delivery_does_not_change_afterwards(transport: InMemoryTransport) -> None:
    await declare(transport, QueueSpec("q", {}))
    await transport.publish(to_queue("q", b"x"))
    first = await transport.get("q")
    assert first is not None
    assert first.redelivered is False
    await first.nack(requeue=True)
    second = await transport.get("q")
    assert second is not None
    assert second.redelivered is True
    assert first.redelivered is False


async def test_requeued_message_goes_back_to_the_head(transport: InMemoryTransport) -> None:
    await declare(transport, QueueSpec("q", {}))
    await transport.publish(to_queue("q", b"first"))
    await transport.publish(to_queue("q", b"second"))
    first = await transport.get("q")
    assert first is not None
    assert first.body == b"first"
    await first.nack(requeue=True)
    again = await transport.get("q")
    assert again is not None
    assert again.body == b"first"
    assert again.redelivered is True


async def test_delivery_limit_dead_letters_via_default_exchange(transport: InMemoryTransport) -> None:
    await declare(transport, QueueSpec("work", {"x-delivery-limit": 2, **DLQ_ARGS}), QueueSpec("work.dlq", {}))
    recorder = Recorder("requeue")
    await transport.subscribe("work", recorder, prefetch=1)
    sig_headers: dict[str, str | int | float | bool | bytes | None] = {
        "x-choreo-alg": "hmac-sha256",
        "x-choreo-kid": "k1",
        "x-choreo-sig": "ab" * 32,
    }
    await transport.publish(to_queue("work", b"poison", headers=sig_headers, message_id="m-1"))
    await wait_until(lambda: transport.queue_depth("work.dlq"))
    # Delivered once, then redelivered up to the limit, then dead-lettered.
    assert len(recorder.deliveries) == 3
    assert recorder.redelivered == [False, True, True]
    assert await transport.queue_depth("work") == 0

    dead = await transport.get("work.dlq")
    assert dead is not None
    assert dead.body == b"poison"
    assert dead.exchange == ""
    assert dead.routing_key == "work.dlq"
    assert dead.message_id == "m-1"
    for name, value in sig_headers.items():
        assert dead.headers[name] == value
    entry = death(dead)
    assert entry["queue"] == "work"
    assert entry["reason"] == "delivery_limit"
    assert entry["routing-keys"] == ["work"]


async def test_agent_topology_dead_letters_over_the_delivery_limit(transport: InMemoryTransport) -> None:
    topology = agent_topology("billing", ["order.placed"], delivery_limit=1)
    await transport.declare(topology)
    recorder = Recorder("requeue")
    await transport.subscribe("billing", recorder, prefetch=5)
    await transport.publish(OutgoingMessage(topology.exchange, "order.placed", b"x"))
    await wait_until(lambda: transport.queue_depth("billing.dlq"))
    assert len(recorder.deliveries) == 2
    dead = await transport.get("billing.dlq")
    assert dead is not None
    assert death(dead)["exchange"] == topology.exchange
    assert death(dead)["routing-keys"] == ["order.placed"]


async def test_nack_without_requeue_dead_letters(transport: InMemoryTransport) -> None:
    await declare(transport, QueueSpec("work", {**DLQ_ARGS}, ("order.placed",)), QueueSpec("work.dlq", {}))
    recorder = Recorder("reject")
    await transport.subscribe("work", recorder, prefetch=1)
    await transport.publish(event("order.placed", b"bad", headers={"x-choreo-sig": "00"}))
    await wait_until(lambda: transport.queue_depth("work.dlq"))
    assert len(recorder.deliveries) == 1
    assert await transport.queue_depth("work") == 0
    dead = await transport.get("work.dlq")
    assert dead is not None
    assert dead.body == b"bad"
    assert dead.headers["x-choreo-sig"] == "00"
    assert dead.routing_key == "work.dlq"
    entry = death(dead)
    assert entry["reason"] == "rejected"
    assert entry["queue"] == "work"
    assert entry["exchange"] == EXCHANGE
    assert entry["routing-keys"] == ["order.placed"]


async def test_dead_letter_keeps_original_routing_key_without_dlrk(transport: InMemoryTransport) -> None:
    await declare(transport, QueueSpec("work", {"x-dead-letter-exchange": "dlx"}, ("order.placed",)))
    await transport.declare(Topology("dlx", (QueueSpec("parking", {}, ("order.#",)),)))
    await transport.publish(event("order.placed", b"x"))
    delivery = await transport.get("work")
    assert delivery is not None
    await delivery.nack(requeue=False)
    parked = await transport.get("parking")
    assert parked is not None
    assert parked.routing_key == "order.placed"
    assert parked.exchange == "dlx"
    assert death(parked)["reason"] == "rejected"
    assert death(parked)["exchange"] == EXCHANGE


async def test_second_dead_lettering_prepends_x_death(transport: InMemoryTransport) -> None:
    await declare(
        transport,
        QueueSpec("a", {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "b"}),
        QueueSpec("b", {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "c"}),
        QueueSpec("c", {}),
    )
    await transport.publish(to_queue("a", b"x"))
    for queue in ("a", "b"):
        delivery = await transport.get(queue)
        assert delivery is not None
        await delivery.nack(requeue=False)
    final = await transport.get("c")
    assert final is not None
    deaths = final.headers["x-death"]
    assert isinstance(deaths, list)
    assert [d["queue"] for d in deaths] == ["b", "a"]


async def test_reject_without_dead_letter_exchange_drops(transport: InMemoryTransport) -> None:
    await declare(transport, QueueSpec("q", {}))
    await transport.publish(to_queue("q", b"x"))
    delivery = await transport.get("q")
    assert delivery is not None
    await delivery.nack(requeue=False)
    assert await transport.queue_depth("q") == 0
    assert await transport.get("q") is None


# TTLs ----------------------------------------------------------------------------------------


async def test_queue_message_ttl_dead_letters_expired_messages(transport: InMemoryTransport) -> None:
    await declare(
        transport,
        QueueSpec("delay", {"x-message-ttl": 50, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": "work"}),
        QueueSpec("work", {}),
    )
    started = time.monotonic()
    await transport.publish(to_queue("delay", b"later", message_id="m-1"))
    assert await transport.queue_depth("delay") == 1
    await wait_until(lambda: transport.queue_depth("work"))
    assert time.monotonic() - started >= 0.05  # never before the TTL
    assert await transport.queue_depth("delay") == 0
    moved = await transport.get("work")
    assert moved is not None
    assert moved.body == b"later"
    assert moved.message_id == "m-1"
    entry = death(moved)
    assert entry["reason"] == "expired"
    assert entry["queue"] == "delay"


async def test_queue_message_ttl_expires_each_message_in_order(transport: InMemoryTransport) -> None:
    await declare(
        transport,
        QueueSpec("delay", {"x-message-ttl": 30, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": "work"}),
        QueueSpec("work", {}),
    )
    for i in range(3):
        await transport.publish(to_queue("delay", f"m{i}".encode()))
    await wait_until(lambda: _depth_is(transport, "work", 3))
    bodies = []
    while (delivery := await transport.get("work")) is not None:
        bodies.append(delivery.body)
        await delivery.ack()
    assert bodies == [b"m0", b"m1", b"m2"]


async def _depth_is(transport: InMemoryTransport, queue: str, depth: int) -> bool:
    return await transport.queue_depth(queue) == depth


async def test_queue_message_ttl_counts_from_each_messages_own_enqueue(transport: InMemoryTransport) -> None:
    ttl = 0.3
    await declare(
        transport,
        QueueSpec(
            "delay", {"x-message-ttl": int(ttl * 1000), "x-dead-letter-exchange": "", "x-dead-letter-routing-key": "dl"}
        ),
        QueueSpec("dl", {}),
    )
    first_published = time.monotonic()
    await transport.publish(to_queue("delay", b"m1"))
    taken = await transport.get("delay")
    assert taken is not None
    await taken.ack()
    # Publish the second message well after the first, but before the first one's TTL is up.
    await wait_for_clock(first_published + ttl / 2)
    second_published = time.monotonic()
    await transport.publish(to_queue("delay", b"m2"))
    await wait_until(lambda: transport.queue_depth("dl"))
    assert time.monotonic() - second_published >= ttl


async def test_per_message_expiration_dead_letters_at_delivery(transport: InMemoryTransport) -> None:
    await declare(transport, QueueSpec("work", {**DLQ_ARGS}), QueueSpec("work.dlq", {}))
    published = time.monotonic()
    await transport.publish(to_queue("work", b"stale", expiration_ms=1))
    await transport.publish(to_queue("work", b"fresh-1", expiration_ms=60_000))
    await wait_for_clock(published + 0.001)
    await transport.publish(to_queue("work", b"fresh-2"))
    recorder = Recorder("ack")
    await transport.subscribe("work", recorder, prefetch=5)
    await wait_until(lambda: len(recorder.deliveries) == 2)
    assert recorder.bodies == [b"fresh-1", b"fresh-2"]
    dead = await transport.get("work.dlq")
    assert dead is not None
    assert dead.body == b"stale"
    assert death(dead)["reason"] == "expired"
    assert await transport.get("work.dlq") is None


async def test_per_message_expiration_without_dead_letter_exchange_drops(transport: InMemoryTransport) -> None:
    await declare(transport, QueueSpec("q", {}))
    published = time.monotonic()
    await transport.publish(to_queue("q", b"stale", expiration_ms=1))
    await wait_for_clock(published + 0.001)
    await transport.publish(to_queue("q", b"fresh"))
    recorder = Recorder("ack")
    await transport.subscribe("q", recorder, prefetch=5)
    await wait_until(lambda: len(recorder.deliveries) == 1)
    assert recorder.bodies == [b"fresh"]
    assert await transport.queue_depth("q") == 0


async def test_get_does_not_return_an_expired_message(transport: InMemoryTransport) -> None:
    await declare(transport, QueueSpec("work", {**DLQ_ARGS}), QueueSpec("work.dlq", {}))
    published = time.monotonic()
    await transport.publish(to_queue("work", b"stale", expiration_ms=1))
    await wait_for_clock(published + 0.001)
    delivery = await transport.get("work")
    assert delivery is None
    dead = await transport.get("work.dlq")
    assert dead is not None
    assert death(dead)["reason"] == "expired"


# publishing failures -------------------------------------------------------------------------


async def test_mandatory_publish_to_nothing_raises(transport: InMemoryTransport) -> None:
    await declare(transport, QueueSpec("q", {}, ("order.placed",)))
    with pytest.raises(PublishNotConfirmed, match="unroutable"):
        await transport.publish(event("nobody.listens", b"x", mandatory=True))
    with pytest.raises(PublishNotConfirmed, match="unroutable"):
        await transport.publish(to_queue("no-such-queue", b"x", mandatory=True))
    # Routable mandatory publishes go through; unroutable non-mandatory ones are dropped silently.
    await transport.publish(event("order.placed", b"ok", mandatory=True))
    await transport.publish(event("nobody.listens", b"dropped"))
    assert await transport.queue_depth("q") == 1


async def test_publish_to_missing_exchange_raises(transport: InMemoryTransport) -> None:
    with pytest.raises(PublishNotConfirmed, match="no exchange"):
        await transport.publish(OutgoingMessage("missing.exchange", "a.b", b"x"))


async def test_operations_on_a_closed_transport_raise(broker: InMemoryBroker) -> None:
    connection = broker.transport()
    assert not connection.connected
    with pytest.raises(TransportError, match="not connected"):
        await connection.publish(to_queue("q", b"x"))
    await connection.connect()
    await declare(connection, QueueSpec("q", {}))
    await connection.close()
    assert not connection.connected
    with pytest.raises(TransportError, match="not connected"):
        await connection.get("q")


# topology ------------------------------------------------------------------------------------


async def test_redeclaring_identical_topology_is_idempotent(transport: InMemoryTransport) -> None:
    topology = agent_topology("billing", ["order.placed", "payment.failed"])
    await transport.declare(topology)
    await transport.publish(OutgoingMessage(topology.exchange, "order.placed", b"x"))
    await transport.declare(topology)
    assert await transport.queue_depth("billing") == 1


async def test_redeclaring_queue_with_other_arguments_raises_topology_error(transport: InMemoryTransport) -> None:
    await declare(transport, QueueSpec("q", {"x-delivery-limit": 10, "x-queue-type": "quorum"}))
    with pytest.raises(TopologyError, match="x-delivery-limit") as info:
        await declare(transport, QueueSpec("q", {"x-delivery-limit": 5, "x-queue-type": "quorum"}))
    assert info.value.entity == "q"
    assert info.value.differences == {"x-delivery-limit": (5, 10)}


async def test_topology_error_names_added_and_removed_arguments(transport: InMemoryTransport) -> None:
    await declare(transport, QueueSpec("q", {"x-queue-type": "quorum"}))
    with pytest.raises(TopologyError) as info:
        await declare(transport, QueueSpec("q", {"x-message-ttl": 1000}))
    assert info.value.differences == {
        "x-message-ttl": (1000, None),
        "x-queue-type": (None, "quorum"),
    }


def test_redeclaring_exchange_as_another_kind_raises_topology_error(broker: InMemoryBroker) -> None:
    broker.declare_exchange("ex", "topic")
    broker.declare_exchange("ex", "topic")
    with pytest.raises(TopologyError) as info:
        broker.declare_exchange("ex", "direct")
    assert info.value.differences == {"type": ("direct", "topic")}


async def test_deleted_queue_is_gone_with_its_bindings(transport: InMemoryTransport) -> None:
    await declare(transport, QueueSpec("q", {}, ("order.placed",)))
    await transport.delete_queue("q")
    with pytest.raises(TransportError, match="no queue"):
        await transport.queue_depth("q")
    with pytest.raises(PublishNotConfirmed):
        await transport.publish(event("order.placed", b"x", mandatory=True))


# connections ---------------------------------------------------------------------------------


async def test_closing_a_transport_returns_unacked_deliveries_to_another_consumer(broker: InMemoryBroker) -> None:
    first = broker.transport()
    second = broker.transport()
    await first.connect()
    await second.connect()
    await declare(first, QueueSpec("q", {}))

    holder = Recorder("hold")
    first_subscription = await first.subscribe("q", holder, prefetch=2)
    await first.publish(to_queue("q", b"m1"))
    await first.publish(to_queue("q", b"m2"))
    await wait_until(lambda: len(holder.deliveries) == 2)

    taker = Recorder("ack")
    await second.subscribe("q", taker, prefetch=5)
    assert taker.deliveries == []
    assert await second.queue_depth("q") == 0

    await first.close()
    assert not await first_subscription.is_attached()
    await wait_until(lambda: len(taker.deliveries) == 2)
    assert sorted(taker.bodies) == [b"m1", b"m2"]
    assert taker.redelivered == [True, True]
    # The old connection's deliveries can no longer be settled.
    with pytest.raises(TransportError):
        await holder.deliveries[0].ack()
    assert await second.queue_depth("q") == 0
    await second.close()
    await broker.drain()


async def test_closing_returns_unsettled_get_deliveries(broker: InMemoryBroker) -> None:
    first = broker.transport()
    second = broker.transport()
    await first.connect()
    await second.connect()
    await declare(first, QueueSpec("q", {}))
    await first.publish(to_queue("q", b"m1"))
    taken = await first.get("q")
    assert taken is not None
    assert await second.get("q") is None
    await first.close()
    again = await second.get("q")
    assert again is not None
    assert again.body == b"m1"
    assert again.redelivered is True
    await again.ack()
    assert await second.queue_depth("q") == 0
    await second.close()


async def test_get_returns_none_on_an_empty_queue(transport: InMemoryTransport) -> None:
    await declare(transport, QueueSpec("q", {}))
    assert await transport.get("q") is None
    await transport.publish(to_queue("q", b"one"))
    delivery = await transport.get("q")
    assert delivery is not None
    assert delivery.body == b"one"
    assert delivery.redelivered is False
    await delivery.ack()
    assert await transport.get("q") is None


async def test_get_on_a_missing_queue_raises(transport: InMemoryTransport) -> None:
    with pytest.raises(TransportError, match="no queue"):
        await transport.get("nope")
