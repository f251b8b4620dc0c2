"""inventory: reserves stock for placed orders; releases it when payment or shipping fails.

Rule: an order is rejected if any ``sku`` starts with ``oos-``.
"""

from __future__ import annotations

from choreo import Agent, Context

from ._db import AgentDB
from .events import (
    InventoryRejected,
    InventoryReleased,
    InventoryReserved,
    OrderPlaced,
    PaymentFailed,
    ShippingFailed,
)


class InventoryDB(AgentDB):
    schema = """
    CREATE TABLE IF NOT EXISTS reservations (
        order_id TEXT PRIMARY KEY,
        status TEXT NOT NULL CHECK (status IN ('reserved', 'rejected', 'released')),
        items INTEGER NOT NULL,
        decided_by TEXT NOT NULL,
        released_by TEXT
    ) WITHOUT ROWID;
    """


agent: Agent[InventoryDB] = Agent("inventory", state=InventoryDB.for_agent, version="1")


@agent.on(OrderPlaced)
async def reserve(event: OrderPlaced, ctx: Context[InventoryDB]) -> InventoryReserved | InventoryRejected | None:
    missing = [item.sku for item in event.items if item.sku.startswith("oos-")]
    decision = {"status": "rejected" if missing else "reserved", "items": sum(i.qty for i in event.items)}
    if not ctx.state.decide_once("reservations", event.order_id, ctx.event_id, decision):
        return None  # this order was already decided by another order.placed
    if missing:
        return InventoryRejected(order_id=event.order_id, out_of_stock=missing)
    return InventoryReserved(
        order_id=event.order_id,
        customer_id=event.customer_id,
        country=event.country,
        total_cents=event.total_cents,
        currency=event.currency,
    )


@agent.on(PaymentFailed, ShippingFailed)
async def release(event: PaymentFailed | ShippingFailed, ctx: Context[InventoryDB]) -> InventoryReleased | None:
    """Compensation: give back what was reserved for an order that cannot complete."""
    with ctx.state.transaction() as db:
        row = db.execute(
            "SELECT status, released_by FROM reservations WHERE order_id = ?", (event.order_id,)
        ).fetchone()
        if row is None:
            return None
        status, released_by = row
        if status == "reserved":
            db.execute(
                "UPDATE reservations SET status = 'released', released_by = ? WHERE order_id = ?",
                (ctx.event_id, event.order_id),
            )
        elif released_by != ctx.event_id:
            return None
    return InventoryReleased(order_id=event.order_id)
