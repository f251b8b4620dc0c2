"""shipping: schedules shipments for paid orders.

Rule: shipping fails if ``country`` == ``XX``.
"""

from __future__ import annotations

from choreo import Agent, Context

from ._db import AgentDB
from .events import PaymentCaptured, ShipmentScheduled, ShippingFailed


class ShippingDB(AgentDB):
    schema = """
    CREATE TABLE IF NOT EXISTS shipments (
        order_id TEXT PRIMARY KEY,
        status TEXT NOT NULL CHECK (status IN ('scheduled', 'failed')),
        country TEXT NOT NULL,
        decided_by TEXT NOT NULL
    ) WITHOUT ROWID;
    """


agent: Agent[ShippingDB] = Agent("shipping", state=ShippingDB.for_agent, version="1")


@agent.on(PaymentCaptured)
async def schedule(event: PaymentCaptured, ctx: Context[ShippingDB]) -> ShipmentScheduled | ShippingFailed | None:
    failed = event.country == "XX"
    decision = {"status": "failed" if failed else "scheduled", "country": event.country}
    if not ctx.state.decide_once("shipments", event.order_id, ctx.event_id, decision):
        return None
    if failed:
        return ShippingFailed(order_id=event.order_id, reason=f"no carrier serves country {event.country}")
    return ShipmentScheduled(order_id=event.order_id, shipment_id=f"shp-{event.order_id}")
