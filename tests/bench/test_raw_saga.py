"""bench/raw_saga.py, the raw aio-pika baseline of the saga, does the same choreography as the
choreo agents: the same bindings; every order ends as its plan says, with the compensations it
calls for, whatever order the deliveries come in; and on the broker a relay declares the same
kind of queue and publishes persistent messages, so both sides carry the same traffic."""

from __future__ import annotations

import asyncio
import random
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest

from agents.saga import SAGA_AGENTS, AuditLog, plan_orders, verify
from choreo.topology import DEFAULT_DELIVERY_LIMIT

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import raw_saga  # noqa: E402


def test_each_relay_is_bound_to_what_the_choreo_agent_of_that_name_handles() -> None:
    assert {a.name: set(a.handled_types) for a in SAGA_AGENTS} == {
        name: set(types) for name, types in raw_saga.BINDINGS.items()
    }


def run_saga(orders: int, seed: int) -> AuditLog:
    """The four deciders over a simulated topic exchange. Each step hands a random pending
    delivery to its agent, so an agent may see an order's events in any order (a compensation
    before the failure that called for it, say)."""
    deciders = {name: raw_saga.DECIDERS[name]() for name in raw_saga.BINDINGS}
    rng = random.Random(seed)
    log = AuditLog()
    pending: list[tuple[str, dict[str, Any]]] = []

    def publish(raw: bytes) -> None:
        event = orjson.loads(raw)
        oid, kind = event["payload"]["order_id"], event["type"]
        if kind == "order.completed":
            log.terminals[oid][event["id"]] = "completed"
        elif kind == "order.cancelled":
            log.terminals[oid][event["id"]] = event["payload"]["reason"]
        elif kind == "inventory.released":
            log.releases[oid].add(event["id"])
        elif kind == "payment.captured":
            log.captures[oid].add(event["id"])
        elif kind == "payment.refunded":
            log.refunds[oid].add(event["id"])
        pending.extend((name, event) for name, types in raw_saga.BINDINGS.items() if kind in types)

    plans = plan_orders(orders, seed=seed)
    for plan in plans:
        publish(raw_saga.body("shop", "order.placed", plan.event.model_dump(mode="json"), None))
    while pending:
        name, event = pending.pop(rng.randrange(len(pending)))
        for out_type, payload in deciders[name](event["type"], event["payload"]):
            publish(raw_saga.body(name, out_type, payload, event["id"]))
    assert verify(plans, log) == []
    return log


@pytest.mark.parametrize("seed", range(5))
def test_every_order_ends_as_planned_with_its_compensations_in_any_delivery_order(seed: int) -> None:
    run_saga(300, seed)


def test_bodies_carry_what_the_bench_observer_reads_at_the_wire_formats_resolution() -> None:
    event = orjson.loads(raw_saga.body("payments", "payment.failed", {"order_id": "o-1", "reason": "x"}, "e-0"))
    assert {"id", "type", "source", "causation_id", "issued_at", "payload"} <= set(event)
    assert event["causation_id"] == "e-0"
    assert event["source"] == "payments"
    stamp = event["issued_at"]
    assert stamp.endswith("Z")
    assert len(stamp.split(".")[1]) == 4  # three digits of milliseconds, then Z


@pytest.mark.rabbitmq
def test_a_relay_declares_a_quorum_queue_and_publishes_persistent_events(amqp_url: str) -> None:
    run = secrets.token_hex(4)
    exchange, prefix = f"test-{run}.events", f"test-{run}."
    command = [sys.executable, str(ROOT / "bench" / "raw_saga.py"), "relay", "inventory", "--url", amqp_url]
    command += ["--exchange", exchange, "--prefix", prefix, "--delivery-limit", str(DEFAULT_DELIVERY_LIMIT)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as relay:
        try:
            asyncio.run(_check_relay(amqp_url, relay, exchange, raw_saga.queue_name(prefix, "inventory")))
        finally:
            relay.terminate()
            relay.wait(30)
    assert relay.returncode == 0


async def _check_relay(url: str, relay: subprocess.Popen[str], exchange_name: str, queue: str) -> None:
    conn = await aio_pika.connect(url)
    try:
        assert relay.stdout is not None
        ready = await asyncio.wait_for(asyncio.to_thread(relay.stdout.readline), timeout=30)
        assert ready.strip() == "ready", relay.stderr.read() if relay.stderr else ""
        channel = await conn.channel(publisher_confirms=True)
        # Redeclaring with the arguments choreo's queues carry passes only if they are the same
        # (a difference closes the channel with PRECONDITION_FAILED).
        same = {"x-queue-type": "quorum", "x-delivery-limit": DEFAULT_DELIVERY_LIMIT}
        await channel.declare_queue(queue, durable=True, arguments=same)
        tap = await channel.declare_queue("", exclusive=True)
        await tap.bind(exchange_name, "inventory.*")
        exchange = await channel.get_exchange(exchange_name)
        order = plan_orders(1, seed=1)[0].event.model_dump(mode="json")
        placed = raw_saga.body("shop", "order.placed", order, None)
        await exchange.publish(aio_pika.Message(placed, delivery_mode=2), routing_key="order.placed")
        async with tap.iterator(timeout=30) as messages:
            message = await anext(aiter(messages))
        event = orjson.loads(message.body)
        assert event["type"] == "inventory.reserved"
        assert event["causation_id"] == orjson.loads(placed)["id"]
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    finally:
        channel = await conn.channel()
        await channel.queue_delete(queue)
        await channel.exchange_delete(exchange_name)
        await conn.close()
