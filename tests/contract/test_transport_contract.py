"""The transport contract (``choreo.transport.base``), one suite for every transport.

Each test runs against the in-memory broker and against a real RabbitMQ (the ``transport``
fixture is parametrized), so the in-memory model is held to what the broker really does.
RabbitMQ delivers asynchronously: tests wait on conditions, never for a fixed time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from choreo.errors import PublishNotConfirmed, TopologyError, TransportError
from choreo.testing import wait_for
from choreo.topology import Naming, QueueSpec, Topology, agent_topology
from choreo.transport import Delivery, OutgoingMessage, Subscription, Transport

TransportFactory = Callable[[], Awaitable[Transport]]


async def until(check: Callable[[], Awaitable[bool]], *, within: float = 10.0, what: str = "condition") -> None:
    """Poll an async ``check`` until it is true; raise TimeoutError after ``within`` seconds."""
    await wait_for(check, within=within, what=what)


async def depth_is(transport: Transport, queue: str, expected: int, *, within: float = 10.0) -> None:
    async def check() -> bool:
        return await transport.queue_depth(queue) == expected

    await until(check, within=within, what=f"{queue} to hold {expected} ready message(s)")


def plain_queue(naming: Naming, suffix: str, *bindings: str) -> QueueSpec:
    return QueueSpec(name=f"{naming.queue_prefix}{suffix}", arguments={"x-queue-type": "quorum"}, bindings=bindings)


def message(naming: Naming, routing_key: str, body: bytes = b"{}", **kwargs: object) -> OutgoingMessage:
    return OutgoingMessage(exchange=naming.exchange, routing_key=routing_key, body=body, **kwargs)  # type: ignore[arg-type]


async def drain_with_get(transport: Transport, queue: str) -> list[Delivery]:
    """Fetch and ack every ready message of ``queue``."""
    taken: list[Delivery] = []
    while (delivery := await transport.get(queue)) is not None:
        await delivery.ack()
        taken.append(delivery)
    return taken


class Collector:
    """A subscription handler that records deliveries and acks them."""

    def __init__(self, *, ack: bool = True) -> None:
        self.ack = ack
        self.deliveries: list[Delivery] = []

    async def __call__(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)
        if self.ack:
            await delivery.ack()

    @property
    def bodies(self) -> list[bytes]:
        return [d.body for d in self.deliveries]


async def test_publish_then_subscribe_delivers_body_headers_routing_key_and_message_id(
    transport: Transport, naming: Naming
) -> None:
    queue = plain_queue(naming, "basic", "order.placed")
    await transport.declare(Topology(naming.exchange, (queue,)))
    body = b'{"id":"e-1","payload":{"text":"caf\xc3\xa9"}}'
    headers: dict[str, str | int | float | bool | bytes | None] = {
        "x-choreo-kid": "k1",
        "x-choreo-sig": "ab" * 32,
        "x-count": 42,
        "x-negative": -7,
    }
    await transport.publish(message(naming, "order.placed", body, headers=headers, message_id="m-1"))

    collector = Collector()
    await transport.subscribe(queue.name, collector, prefetch=4)
    await wait_for(lambda: len(collector.deliveries) == 1, within=10, what="the delivery")

    delivery = collector.deliveries[0]
    assert delivery.body == body
    assert delivery.routing_key == "order.placed"
    assert delivery.exchange == naming.exchange
    assert delivery.message_id == "m-1"
    assert delivery.redelivered is False
    for key, value in headers.items():
        assert delivery.headers[key] == value
        assert type(delivery.headers[key]) is type(value)


async def test_topic_bindings_match_star_as_one_word_and_hash_as_zero_or_more(
    transport: Transport, naming: Naming
) -> None:
    star = plain_queue(naming, "star", "order.*")
    hash_tail = plain_queue(naming, "hash-tail", "order.#")
    hash_head = plain_queue(naming, "hash-head", "#.placed")
    await transport.declare(Topology(naming.exchange, (star, hash_tail, hash_head)))

    keys = ["order.placed", "order.placed.eu", "order", "payment.placed", "shipment.failed"]
    for key in keys:
        await transport.publish(message(naming, key, key.encode()))

    expected = {
        star.name: {b"order.placed"},
        hash_tail.name: {b"order.placed", b"order.placed.eu", b"order"},
        hash_head.name: {b"order.placed", b"payment.placed"},
    }
    for name, bodies in expected.items():
        await depth_is(transport, name, len(bodies))
        got = await drain_with_get(transport, name)
        assert {d.body for d in got} == bodies, name
        assert {d.routing_key for d in got} == {b.decode() for b in bodies}


async def test_prefetch_bounds_unsettled_deliveries(transport: Transport, naming: Naming) -> None:
    queue = plain_queue(naming, "prefetch", "work.item")
    await transport.declare(Topology(naming.exchange, (queue,)))
    total, prefetch = 10, 3
    for i in range(total):
        await transport.publish(message(naming, "work.item", str(i).encode()))

    gate = asyncio.Event()
    in_flight = 0
    max_in_flight = 0
    done: list[bytes] = []

    async def handler(delivery: Delivery) -> None:
        nonlocal in_flight, max_in_flight
        in_flight += 1
        max_in_flight = max(max_in_flight, in_flight)
        try:
            await gate.wait()
        finally:
            in_flight -= 1
        done.append(delivery.body)
        await delivery.ack()

    await transport.subscribe(queue.name, handler, prefetch=prefetch)
    try:
        await wait_for(lambda: in_flight == prefetch, within=10, what="prefetch deliveries in flight")
        # The broker holds the rest back while the prefetch window is full.
        await depth_is(transport, queue.name, total - prefetch)
        assert max_in_flight == prefetch
    finally:
        gate.set()
    await wait_for(lambda: len(done) == total, within=10, what="every delivery handled")
    assert max_in_flight == prefetch
    assert sorted(done, key=int) == [str(i).encode() for i in range(total)]


async def test_ack_removes_the_message_for_good(transport_factory: TransportFactory, naming: Naming) -> None:
    consumer_conn = await transport_factory()
    queue = plain_queue(naming, "ack", "a.b")
    await consumer_conn.declare(Topology(naming.exchange, (queue,)))
    await consumer_conn.publish(message(naming, "a.b", b"once"))

    collector = Collector(ack=True)
    await consumer_conn.subscribe(queue.name, collector, prefetch=1)
    await wait_for(lambda: len(collector.deliveries) == 1, what="the delivery")
    # Closing the connection would return an unacked delivery; an acked one stays gone.
    await consumer_conn.close()

    observer = await transport_factory()
    assert await observer.queue_depth(queue.name) == 0
    assert await observer.get(queue.name) is None
    assert collector.bodies == [b"once"]


async def test_nack_with_requeue_redelivers_with_the_redelivered_flag(transport: Transport, naming: Naming) -> None:
    queue = plain_queue(naming, "nack", "a.b")
    await transport.declare(Topology(naming.exchange, (queue,)))
    await transport.publish(message(naming, "a.b", b"again", message_id="m-2"))

    seen: list[tuple[bytes, bool, str | None]] = []

    async def handler(delivery: Delivery) -> None:
        seen.append((delivery.body, delivery.redelivered, delivery.message_id))
        if len(seen) == 1:
            await delivery.nack(requeue=True)
        else:
            await delivery.ack()

    await transport.subscribe(queue.name, handler, prefetch=1)
    await wait_for(lambda: len(seen) == 2, what="the redelivery")
    assert seen == [(b"again", False, "m-2"), (b"again", True, "m-2")]
    await depth_is(transport, queue.name, 0)


@pytest.mark.parametrize("limit", [1, 2])
async def test_quorum_delivery_limit_dead_letters_to_the_agent_dlq(
    transport: Transport, naming: Naming, limit: int
) -> None:
    topology = agent_topology("limited", ["thing.happened"], naming=naming, delivery_limit=limit)
    await transport.declare(topology)
    queues = naming.agent_queues("limited")
    body = b'{"poison":true}'
    await transport.publish(message(naming, "thing.happened", body, headers={"x-tag": "p"}, message_id="m-p"))

    attempts: list[bool] = []

    async def always_requeue(delivery: Delivery) -> None:
        attempts.append(delivery.redelivered)
        await delivery.nack(requeue=True)

    await transport.subscribe(queues.main, always_requeue, prefetch=1)
    await depth_is(transport, queues.dlq, 1)

    dead = await transport.get(queues.dlq)
    assert dead is not None
    assert dead.body == body
    assert dead.headers["x-tag"] == "p"
    assert dead.message_id == "m-p"
    await dead.ack()
    # The first delivery plus ``limit`` redeliveries, then the broker dead-letters it.
    assert attempts == [False] + [True] * limit
    assert await transport.queue_depth(queues.main) == 0


async def test_mandatory_publish_to_unbound_key_on_default_exchange_raises(
    transport: Transport, naming: Naming
) -> None:
    await transport.declare(Topology(naming.exchange, (plain_queue(naming, "exists", "a.b"),)))
    with pytest.raises(PublishNotConfirmed):
        await transport.publish(
            OutgoingMessage(exchange="", routing_key=f"{naming.queue_prefix}missing", body=b"x", mandatory=True)
        )
    # The connection stays usable after the refusal.
    await transport.publish(
        OutgoingMessage(exchange="", routing_key=f"{naming.queue_prefix}exists", body=b"y", mandatory=True)
    )
    await depth_is(transport, f"{naming.queue_prefix}exists", 1)


async def test_non_mandatory_publish_to_unbound_key_on_topic_exchange_is_dropped_silently(
    transport: Transport, naming: Naming
) -> None:
    queue = plain_queue(naming, "bound", "a.b")
    await transport.declare(Topology(naming.exchange, (queue,)))
    await transport.publish(message(naming, "nobody.listens", b"lost"))
    await transport.publish(message(naming, "a.b", b"kept"))
    await depth_is(transport, queue.name, 1)
    got = await drain_with_get(transport, queue.name)
    assert [d.body for d in got] == [b"kept"]


async def test_declaring_the_same_topology_twice_is_idempotent(transport: Transport, naming: Naming) -> None:
    topology = agent_topology("twice", ["x.y"], naming=naming, delivery_limit=3)
    await transport.declare(topology)
    await transport.publish(message(naming, "x.y", b"survives"))
    await transport.declare(topology)
    queues = naming.agent_queues("twice")
    await depth_is(transport, queues.main, 1)
    got = await drain_with_get(transport, queues.main)
    assert [d.body for d in got] == [b"survives"]


async def test_declaring_an_existing_queue_with_another_delivery_limit_names_the_difference(
    transport: Transport, naming: Naming
) -> None:
    await transport.declare(agent_topology("conflict", ["x.y"], naming=naming, delivery_limit=3))
    with pytest.raises(TopologyError) as info:
        await transport.declare(agent_topology("conflict", ["x.y"], naming=naming, delivery_limit=5))
    assert "x-delivery-limit" in info.value.differences
    assert info.value.entity == naming.agent_queues("conflict").main
    assert "x-delivery-limit" in str(info.value)
    assert "declared 5" in str(info.value)
    assert "existing 3" in str(info.value)
    # The failed declaration did not break the connection.
    await transport.publish(message(naming, "x.y", b"still works"))
    await depth_is(transport, naming.agent_queues("conflict").main, 1)


async def hoard(
    transport: Transport, naming: Naming, suffix: str, count: int
) -> tuple[QueueSpec, Collector, Subscription]:
    """A queue holding ``count`` messages, all delivered to a consumer that settles none."""
    queue = plain_queue(naming, suffix, "a.b")
    await transport.declare(Topology(naming.exchange, (queue,)))
    for i in range(count):
        await transport.publish(message(naming, "a.b", f"m{i}".encode()))
    hoarder = Collector(ack=False)
    subscription = await transport.subscribe(queue.name, hoarder, prefetch=10)
    await wait_for(lambda: len(hoarder.deliveries) == count, what=f"{count} unacked deliveries")
    return queue, hoarder, subscription


async def test_closing_a_connection_returns_its_unacked_deliveries(
    transport_factory: TransportFactory, naming: Naming
) -> None:
    first = await transport_factory()
    queue, _, _ = await hoard(first, naming, "return", 3)
    assert await first.queue_depth(queue.name) == 0
    await first.close()

    second = await transport_factory()
    collector = Collector(ack=True)
    await second.subscribe(queue.name, collector, prefetch=10)
    await wait_for(lambda: len(collector.deliveries) == 3, what="the returned deliveries")
    assert sorted(collector.bodies) == [b"m0", b"m1", b"m2"]
    assert all(d.redelivered for d in collector.deliveries)


async def test_deliveries_unacked_when_their_subscription_was_cancelled_return_when_the_connection_closes(
    transport_factory: TransportFactory, naming: Naming
) -> None:
    """A cancelled consumer's deliveries stay unacked (a stopping worker may still settle
    them); those it never settles come back with the connection, as RabbitMQ does."""
    first = await transport_factory()
    queue, hoarder, subscription = await hoard(first, naming, "cancelreturn", 2)
    await subscription.cancel()
    await hoarder.deliveries[0].ack()  # still valid after the cancel
    await first.close()

    second = await transport_factory()
    collector = Collector(ack=True)
    await second.subscribe(queue.name, collector, prefetch=10)
    await wait_for(lambda: len(collector.deliveries) == 1, what="the returned delivery")
    assert collector.bodies == [hoarder.deliveries[1].body]
    assert collector.deliveries[0].redelivered


async def test_closing_a_subscription_sends_its_acks_and_returns_the_rest_on_an_open_connection(
    transport: Transport, naming: Naming
) -> None:
    queue, hoarder, subscription = await hoard(transport, naming, "subclose", 3)
    await hoarder.deliveries[1].ack()
    await subscription.close()
    await depth_is(transport, queue.name, 2)  # the acked one is gone, the other two are back
    with pytest.raises(TransportError):
        await hoarder.deliveries[0].ack()  # returned: no longer ours to settle
    got = await drain_with_get(transport, queue.name)
    assert sorted(d.body for d in got) == [hoarder.deliveries[0].body, hoarder.deliveries[2].body]
    assert all(d.redelivered for d in got)
    await subscription.close()  # closing twice is harmless


async def test_get_returns_none_on_empty_and_a_delivery_otherwise(transport: Transport, naming: Naming) -> None:
    queue = plain_queue(naming, "get", "a.b")
    await transport.declare(Topology(naming.exchange, (queue,)))
    assert await transport.get(queue.name) is None

    await transport.publish(message(naming, "a.b", b"fetched", headers={"h": "v"}, message_id="m-g"))
    await depth_is(transport, queue.name, 1)
    delivery = await transport.get(queue.name)
    assert delivery is not None
    assert (delivery.body, delivery.routing_key, delivery.message_id) == (b"fetched", "a.b", "m-g")
    assert delivery.headers["h"] == "v"
    await delivery.ack()
    assert await transport.get(queue.name) is None
    assert await transport.queue_depth(queue.name) == 0


async def test_cancelled_subscription_receives_no_new_deliveries(transport: Transport, naming: Naming) -> None:
    queue = plain_queue(naming, "cancel", "a.b")
    await transport.declare(Topology(naming.exchange, (queue,)))
    collector = Collector(ack=True)
    subscription = await transport.subscribe(queue.name, collector, prefetch=5)
    assert subscription.queue == queue.name

    await transport.publish(message(naming, "a.b", b"before"))
    await wait_for(lambda: len(collector.deliveries) == 1, what="the first delivery")
    await subscription.cancel()

    await transport.publish(message(naming, "a.b", b"after"))
    # It stays ready in the queue instead of going to the cancelled consumer.
    await depth_is(transport, queue.name, 1)
    assert collector.bodies == [b"before"]
    got = await drain_with_get(transport, queue.name)
    assert [d.body for d in got] == [b"after"]


async def test_subscription_reports_attached_until_cancelled(transport: Transport, naming: Naming) -> None:
    queue = plain_queue(naming, "attached", "a.b")
    await transport.declare(Topology(naming.exchange, (queue,)))
    subscription = await transport.subscribe(queue.name, Collector(), prefetch=1)
    await wait_for(subscription.is_attached, what="the consumer to attach")
    await subscription.cancel()
    assert not await subscription.is_attached()
    await subscription.cancel()  # cancelling twice is harmless
    assert not await subscription.is_attached()


async def test_queue_depth_counts_ready_messages_only(transport: Transport, naming: Naming) -> None:
    queue = plain_queue(naming, "depth", "a.b")
    await transport.declare(Topology(naming.exchange, (queue,)))
    assert await transport.queue_depth(queue.name) == 0
    for i in range(3):
        await transport.publish(message(naming, "a.b", f"d{i}".encode()))
    await depth_is(transport, queue.name, 3)

    taken = await transport.get(queue.name)
    assert taken is not None
    assert await transport.queue_depth(queue.name) == 2  # unacked is not ready
    await taken.nack(requeue=True)
    await depth_is(transport, queue.name, 3)

    taken = await transport.get(queue.name)
    assert taken is not None
    await taken.ack()
    await depth_is(transport, queue.name, 2)


async def test_get_on_a_missing_queue_raises_and_leaves_publishing_working(
    transport: Transport, naming: Naming
) -> None:
    queue = plain_queue(naming, "afterget", "a.b")
    await transport.declare(Topology(naming.exchange, (queue,)))
    with pytest.raises(TransportError):
        await transport.get(f"{naming.queue_prefix}does-not-exist")
    await transport.publish(message(naming, "a.b", b"still publishing"))
    await depth_is(transport, queue.name, 1)
    got = await transport.get(queue.name)
    assert got is not None
    assert got.body == b"still publishing"
    await got.ack()


async def test_inspect_queue_reports_presence_depth_and_drift_without_creating(
    transport: Transport, naming: Naming
) -> None:
    existing = agent_topology("inspected", ["x.y"], naming=naming, delivery_limit=3)
    await transport.declare(existing)
    await transport.publish(message(naming, "x.y", b"one"))
    await depth_is(transport, naming.agent_queues("inspected").main, 1)
    declared = agent_topology("inspected", ["x.y"], naming=naming, delivery_limit=5)
    main = await transport.inspect_queue(declared.queues[0])
    assert main.exists
    assert main.depth == 1
    assert set(main.drift) == {"x-delivery-limit"}
    assert [str(v) for v in main.drift["x-delivery-limit"]] == ["5", "3"]
    same = await transport.inspect_queue(existing.queues[0])
    assert same.drift == {}
    missing = await transport.inspect_queue(QueueSpec(f"{naming.queue_prefix}never-declared", {}))
    assert not missing.exists
    with pytest.raises(TransportError):  # inspecting created nothing
        await transport.queue_depth(f"{naming.queue_prefix}never-declared")
