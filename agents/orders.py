"""orders: ends every order exactly once, with ``order.completed`` or ``order.cancelled``.

A failure cancels the order only once every compensation it calls for has arrived, in
whatever order the events come:

| failure | reason | waits for |
|---|---|---|
| inventory.rejected | out_of_stock | nothing |
| payment.failed | payment_declined | inventory.released |
| shipping.failed | shipping_failed | inventory.released and payment.refunded |
"""

from __future__ import annotations

from choreo import Agent, Context

from ._db import AgentDB
from .events import (
    CancelReason,
    InventoryRejected,
    InventoryReleased,
    OrderCancelled,
    OrderCompleted,
    PaymentFailed,
    PaymentRefunded,
    ShipmentScheduled,
    ShippingFailed,
)

REQUIRED: dict[str, tuple[str, ...]] = {
    "out_of_stock": (),
    "payment_declined": ("released",),
    "shipping_failed": ("released", "refunded"),
}


class OrdersDB(AgentDB):
    schema = """
    CREATE TABLE IF NOT EXISTS orders (
        order_id TEXT PRIMARY KEY,
        failure TEXT,
        released INTEGER NOT NULL DEFAULT 0,
        refunded INTEGER NOT NULL DEFAULT 0,
        outcome TEXT CHECK (outcome IN ('completed', 'cancelled')),
        decided_by TEXT
    ) WITHOUT ROWID;
    """


agent: Agent[OrdersDB] = Agent("orders", state=OrdersDB.for_agent, version="1")


def _record(ctx: Context[OrdersDB], order_id: str, column: str, value: str | int) -> OrderCancelled | None:
    """Record one fact about an order; cancel it if that completes what its failure needs."""
    assert column in {"failure", "released", "refunded"}
    with ctx.state.transaction() as db:
        db.execute("INSERT OR IGNORE INTO orders (order_id) VALUES (?)", (order_id,))
        db.execute(f"UPDATE orders SET {column} = ? WHERE order_id = ?", (value, order_id))
        failure, released, refunded, outcome, decided_by = db.execute(
            "SELECT failure, released, refunded, outcome, decided_by FROM orders WHERE order_id = ?", (order_id,)
        ).fetchone()
        if outcome is not None:
            # Already ended; re-emit only when this very event ended it (a redelivery).
            return OrderCancelled(order_id=order_id, reason=failure) if decided_by == ctx.event_id else None
        if failure is None:
            return None
        have = {"released": bool(released), "refunded": bool(refunded)}
        if not all(have[need] for need in REQUIRED[failure]):
            return None
        db.execute(
            "UPDATE orders SET outcome = 'cancelled', decided_by = ? WHERE order_id = ?", (ctx.event_id, order_id)
        )
    reason: CancelReason = failure
    return OrderCancelled(order_id=order_id, reason=reason)


@agent.on(ShipmentScheduled)
async def complete(event: ShipmentScheduled, ctx: Context[OrdersDB]) -> OrderCompleted | None:
    with ctx.state.transaction() as db:
        db.execute("INSERT OR IGNORE INTO orders (order_id) VALUES (?)", (event.order_id,))
        outcome, decided_by = db.execute(
            "SELECT outcome, decided_by FROM orders WHERE order_id = ?", (event.order_id,)
        ).fetchone()
        if outcome is not None:
            return OrderCompleted(order_id=event.order_id) if decided_by == ctx.event_id else None
        db.execute(
            "UPDATE orders SET outcome = 'completed', decided_by = ? WHERE order_id = ?",
            (ctx.event_id, event.order_id),
        )
    return OrderCompleted(order_id=event.order_id)


@agent.on(InventoryRejected)
async def out_of_stock(event: InventoryRejected, ctx: Context[OrdersDB]) -> OrderCancelled | None:
    return _record(ctx, event.order_id, "failure", "out_of_stock")


@agent.on(PaymentFailed)
async def payment_declined(event: PaymentFailed, ctx: Context[OrdersDB]) -> OrderCancelled | None:
    return _record(ctx, event.order_id, "failure", "payment_declined")


@agent.on(ShippingFailed)
async def shipping_failed(event: ShippingFailed, ctx: Context[OrdersDB]) -> OrderCancelled | None:
    return _record(ctx, event.order_id, "failure", "shipping_failed")


@agent.on(InventoryReleased)
async def released(event: InventoryReleased, ctx: Context[OrdersDB]) -> OrderCancelled | None:
    return _record(ctx, event.order_id, "released", 1)


@agent.on(PaymentRefunded)
async def refunded(event: PaymentRefunded, ctx: Context[OrdersDB]) -> OrderCancelled | None:
    return _record(ctx, event.order_id, "refunded", 1)
