"""bench/raw_saga.py, the raw aio-pika baseline of the saga, does the same choreography as the
choreo agents: the same bindings, and every order ends as its plan says with the compensations
it calls for, so both sides of the comparison carry the same messages."""

from __future__ import annotations

import collections
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from agents.saga import SAGA_AGENTS, AuditLog, plan_orders, verify

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import raw_saga  # noqa: E402


def test_each_relay_is_bound_to_what_the_choreo_agent_of_that_name_handles() -> None:
    assert {a.name: set(a.handled_types) for a in SAGA_AGENTS} == {
        name: set(types) for name, types in raw_saga.BINDINGS.items()
    }


def run_saga(orders: int, *, lifo: bool) -> tuple[AuditLog, collections.Counter[str]]:
    """The four deciders over a simulated topic exchange; ``lifo`` delivers the newest event
    first, so compensations and failures reach the orders agent in another order."""
    deciders = {name: raw_saga.DECIDERS[name]() for name in raw_saga.BINDINGS}
    plans = plan_orders(orders, seed=3)
    pending: list[dict[str, Any]] = [
        orjson.loads(raw_saga.body("shop", "order.placed", p.event.model_dump(mode="json"), None)) for p in plans
    ]
    log = AuditLog()
    deliveries: collections.Counter[str] = collections.Counter()
    while pending:
        event = pending.pop() if lifo else pending.pop(0)
        payload, oid = event["payload"], event["payload"]["order_id"]
        kind = event["type"]
        if kind == "order.completed":
            log.terminals[oid][event["id"]] = "completed"
        elif kind == "order.cancelled":
            log.terminals[oid][event["id"]] = payload["reason"]
        elif kind == "inventory.released":
            log.releases[oid].add(event["id"])
        elif kind == "payment.captured":
            log.captures[oid].add(event["id"])
        elif kind == "payment.refunded":
            log.refunds[oid].add(event["id"])
        for name, types in raw_saga.BINDINGS.items():
            if kind in types:
                deliveries[name] += 1
                for out_type, out in deciders[name](kind, payload):
                    pending.append(orjson.loads(raw_saga.body(name, out_type, out, event["id"])))
    assert verify(plans, log) == []
    return log, deliveries


@pytest.mark.parametrize("lifo", [False, True])
def test_every_order_ends_as_planned_with_its_compensations(lifo: bool) -> None:
    log, deliveries = run_saga(400, lifo=lifo)
    assert len(log.terminals) == 400
    assert set(deliveries) == set(raw_saga.BINDINGS)


def test_bodies_carry_what_the_bench_observer_reads_at_the_wire_formats_resolution() -> None:
    event = orjson.loads(raw_saga.body("payments", "payment.failed", {"order_id": "o-1", "reason": "x"}, "e-0"))
    assert {"id", "type", "source", "causation_id", "issued_at", "payload"} <= set(event)
    assert event["causation_id"] == "e-0"
    assert event["source"] == "payments"
    stamp = event["issued_at"]
    assert stamp.endswith("Z")
    assert len(stamp.split(".")[1]) == 4
