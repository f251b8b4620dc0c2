"""Baseline: the order saga done with raw aio-pika, as a user without a framework would write it.

    python bench/raw_saga.py relay AGENT --url URL --exchange X --prefix P   # one agent; prints "ready"
    python bench/raw_saga.py drive --url URL --exchange X --prefix P --orders N --rate R --result F

Four ``relay`` processes, one per agent, each on its own quorum queue bound to the same event
types as the choreo agent of that name, with the same deterministic rules, routing, message
volume, prefetch (256), delivery limit, persistent messages, publisher confirms and event loop
(uvloop, as ``choreo worker``; ``--loop asyncio`` for the standard one) as the choreo saga. What
a relay does per delivery is the naive aio-pika minimum: decode the JSON body, decide from state
kept in a dict, publish each emitted event and await its confirm, then ack. No signature, no
payload validation, no dedup store, no durable state, no retries or dead-lettering: a delivery
whose handling raises is rejected (dropped) with its traceback on stderr, so it cannot stick.

``drive`` publishes the orders of ``agents.saga.plan_orders`` at a fixed rate with raw aio-pika,
then reads the taps and computes hops and saga latencies exactly as the choreo saga's driver does
(``choreo_client.Observer`` and ``saga_report``): the bodies carry the same keys (``id``,
``type``, ``source``, ``causation_id``, ``issued_at`` at millisecond resolution, ``payload``), so
the two sides' hops are measured by the same code from stamps of the same resolution, and
``agents.saga.verify`` checks that every order ended as planned.

No choreo code runs in a relay; the driver uses choreo's bench helpers only to read the results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import signal
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import aio_pika
import orjson

DECLINE_ABOVE_CENTS = 50_000  # agents/payments.py
# Which event types each agent's queue is bound to (as the choreo agents of the same names).
BINDINGS: dict[str, tuple[str, ...]] = {
    "inventory": ("order.placed", "payment.failed", "shipping.failed"),
    "payments": ("inventory.reserved", "shipping.failed"),
    "shipping": ("payment.captured",),
    "orders": (
        "shipment.scheduled",
        "inventory.rejected",
        "payment.failed",
        "shipping.failed",
        "inventory.released",
        "payment.refunded",
    ),
}
# What a failure must wait for before the order is cancelled (agents/orders.py).
REQUIRED: dict[str, tuple[str, ...]] = {
    "out_of_stock": (),
    "payment_declined": ("released",),
    "shipping_failed": ("released", "refunded"),
}

_T = TypeVar("_T")
Payload = dict[str, Any]
Emit = list[tuple[str, Payload]]


def issued_at() -> str:
    """Now, as the wire format writes it: UTC, millisecond resolution."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def body(agent: str, type_: str, payload: Payload, causation_id: str | None) -> bytes:
    return orjson.dumps(
        {
            "id": str(uuid.uuid4()),
            "type": type_,
            "source": agent,
            "causation_id": causation_id,
            "issued_at": issued_at(),
            "payload": payload,
        }
    )


class Inventory:
    def __init__(self) -> None:
        self.reserved: set[str] = set()
        self.released: set[str] = set()

    def __call__(self, type_: str, p: Payload) -> Emit:
        oid = p["order_id"]
        if type_ == "order.placed":
            missing = [i["sku"] for i in p["items"] if i["sku"].startswith("oos-")]
            if missing:
                return [("inventory.rejected", {"order_id": oid, "out_of_stock": missing})]
            self.reserved.add(oid)
            keep = ("customer_id", "country", "total_cents", "currency")
            return [("inventory.reserved", {"order_id": oid, **{k: p[k] for k in keep}})]
        if oid in self.reserved and oid not in self.released:  # payment.failed, shipping.failed
            self.released.add(oid)
            return [("inventory.released", {"order_id": oid})]
        return []


class Payments:
    def __init__(self) -> None:
        self.captured: dict[str, tuple[int, str]] = {}
        self.refunded: set[str] = set()

    def __call__(self, type_: str, p: Payload) -> Emit:
        oid = p["order_id"]
        if type_ == "inventory.reserved":
            if p["customer_id"].startswith("c-blocked") or p["total_cents"] > DECLINE_ABOVE_CENTS:
                return [("payment.failed", {"order_id": oid, "reason": "declined"})]
            self.captured[oid] = (p["total_cents"], p["currency"])
            amount = {"amount_cents": p["total_cents"], "currency": p["currency"]}
            return [("payment.captured", {"order_id": oid, "country": p["country"], **amount})]
        if oid in self.captured and oid not in self.refunded:  # shipping.failed
            self.refunded.add(oid)
            amount_cents, currency = self.captured[oid]
            return [("payment.refunded", {"order_id": oid, "amount_cents": amount_cents, "currency": currency})]
        return []


class Shipping:
    def __call__(self, type_: str, p: Payload) -> Emit:
        oid = p["order_id"]
        if p["country"] == "XX":
            return [("shipping.failed", {"order_id": oid, "reason": "no carrier for XX"})]
        return [("shipment.scheduled", {"order_id": oid, "shipment_id": f"s-{oid}"})]


class Orders:
    FAILURES: ClassVar[dict[str, str]] = {
        "inventory.rejected": "out_of_stock",
        "payment.failed": "payment_declined",
        "shipping.failed": "shipping_failed",
    }

    def __init__(self) -> None:
        self.facts: dict[str, dict[str, Any]] = {}

    def __call__(self, type_: str, p: Payload) -> Emit:
        oid = p["order_id"]
        order = self.facts.setdefault(oid, {"failure": None, "released": False, "refunded": False, "ended": False})
        if order["ended"]:
            return []
        if type_ == "shipment.scheduled":
            order["ended"] = True
            return [("order.completed", {"order_id": oid})]
        if type_ in self.FAILURES:
            order["failure"] = self.FAILURES[type_]
        elif type_ == "inventory.released":
            order["released"] = True
        elif type_ == "payment.refunded":
            order["refunded"] = True
        failure = order["failure"]
        if failure is None or not all(order[need] for need in REQUIRED[failure]):
            return []
        order["ended"] = True
        return [("order.cancelled", {"order_id": oid, "reason": failure})]


DECIDERS: dict[str, Callable[[], Callable[[str, Payload], Emit]]] = {
    "inventory": Inventory,
    "payments": Payments,
    "shipping": Shipping,
    "orders": Orders,
}


def queue_name(prefix: str, agent: str) -> str:
    return f"{prefix}{agent}"


def queue_arguments(delivery_limit: int) -> dict[str, Any]:
    """A relay's queue: quorum, with an explicit delivery limit, as every choreo queue has."""
    return {"x-queue-type": "quorum", "x-delivery-limit": delivery_limit}


async def relay(args: argparse.Namespace) -> None:
    agent = args.agent
    decide = DECIDERS[agent]()
    conn = await aio_pika.connect_robust(args.url)
    publish_channel = await conn.channel(publisher_confirms=True)
    exchange = await publish_channel.declare_exchange(args.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    consume_channel = await conn.channel()
    await consume_channel.set_qos(prefetch_count=args.prefetch)
    queue = await consume_channel.declare_queue(
        queue_name(args.prefix, agent), durable=True, arguments=queue_arguments(args.delivery_limit)
    )
    for type_ in BINDINGS[agent]:
        await queue.bind(args.exchange, type_)

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        try:
            event = orjson.loads(message.body)
            for type_, payload in decide(event["type"], event["payload"]):
                out = aio_pika.Message(body(agent, type_, payload, event["id"]), delivery_mode=2)
                await exchange.publish(out, routing_key=type_)  # returns once confirmed
        except Exception:
            traceback.print_exc()
            await message.reject(requeue=False)
            return
        await message.ack()

    await queue.consume(on_message)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await conn.close()


async def drive(args: argparse.Namespace) -> dict[str, Any]:
    from choreo_client import Observer, paced, read_taps, saga_report

    from agents.saga import SAGA_AGENTS, AuditLog, plan_orders, verify

    plans = plan_orders(args.orders, seed=11, run_id=f"{args.prefix}-")
    observer = Observer(args.url, args.exchange)
    conn = await aio_pika.connect_robust(args.url)
    try:
        channel = await conn.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(args.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        await observer.start()

        async def place(payload: Payload) -> None:
            message = aio_pika.Message(body("bench-shop", "order.placed", payload, None), delivery_mode=2)
            await exchange.publish(message, routing_key="order.placed")

        sent_s = await paced([p.event.model_dump(mode="json") for p in plans], args.rate, place)
        await read_taps(observer, len(plans), args.timeout)
    finally:
        await observer.close()
        await conn.close()
    return saga_report(
        args, plans=plans, observer=observer, sent_s=sent_s, audit_cls=AuditLog, verify=verify, agents=SAGA_AGENTS
    )


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["relay", "drive"])
    parser.add_argument("agent", nargs="?", choices=sorted(BINDINGS), help="relay: which agent")
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--exchange", required=True)
    parser.add_argument("--prefix", required=True, help="queue name prefix (unique per run)")
    parser.add_argument("--prefetch", type=int, default=256)
    parser.add_argument("--delivery-limit", type=int, default=10, help="x-delivery-limit of the relays' queues")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--orders", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100.0, help="orders per second")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--result", help="drive: write the result as JSON here")
    args = parser.parse_args(argv)
    if args.mode == "relay" and args.agent is None:
        parser.error("relay needs an AGENT")
    return args


def run_on(loop: str, main: Coroutine[Any, Any, _T]) -> _T:
    loop_factory = None
    if loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main)


def main(argv: Sequence[str]) -> int:
    """0 once the run ended, even with problems in how orders ended: those are in the result
    (``problem_count``), for ``bench/run.py`` to report as a failure of the run."""
    args = parse(argv)
    if args.mode == "relay":
        run_on(args.loop, relay(args))
        return 0
    root = Path(__file__).resolve().parent
    sys.path[:0] = [str(root), str(root.parent)]  # choreo_client, agents
    started = time.perf_counter()
    result = run_on(args.loop, drive(args))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["process_cpu_s"] = usage.ru_utime + usage.ru_stime
    result["wall_s"] = time.perf_counter() - started
    if args.result:
        Path(args.result).write_text(json.dumps(result, indent=1))
    hop, whole = result["hop_ms"], result["saga_ms"]
    print(
        f"raw-aiopika saga rate={args.rate:g}/s ended={result['ended']}/{result['orders']} "
        f"hop_p50={hop['p50']:.1f}ms hop_p99={hop['p99']:.1f}ms saga_p50={whole['p50']:.1f}ms "
        f"saga_p99={whole['p99']:.1f}ms problems={result['problem_count']} {result['problems'][:3]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
