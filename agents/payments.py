"""payments: captures payment for reserved orders; refunds it when shipping fails.

Rules: a payment is declined if ``total_cents`` > 50000. One charge per order, ever.
The card gateway refuses customers whose id starts with ``c-blocked``: that error is permanent,
and the handler's failure event (``payment.failed``) lets inventory compensate, as a decline does.
"""

from __future__ import annotations

from choreo import Agent, Context, Failure, RetryPolicy

from ._db import AgentDB
from .events import InventoryReserved, PaymentCaptured, PaymentFailed, PaymentRefunded, ShippingFailed

DECLINE_ABOVE_CENTS = 50_000


class PaymentsDB(AgentDB):
    schema = """
    CREATE TABLE IF NOT EXISTS charges (
        order_id TEXT PRIMARY KEY,
        status TEXT NOT NULL CHECK (status IN ('captured', 'declined', 'refunded')),
        amount_cents INTEGER NOT NULL,
        currency TEXT NOT NULL,
        decided_by TEXT NOT NULL,
        refunded_by TEXT
    ) WITHOUT ROWID;
    """


class GatewayRefusedError(Exception):
    """The card gateway refused the customer: retrying cannot help."""


agent: Agent[PaymentsDB] = Agent(
    "payments", state=PaymentsDB.for_agent, version="1", retry=RetryPolicy(permanent=(GatewayRefusedError,))
)


def charge_card(customer_id: str, amount_cents: int) -> None:
    """Stand-in for the card gateway call."""
    if customer_id.startswith("c-blocked"):
        raise GatewayRefusedError(f"gateway refused customer {customer_id}")


def payment_error(event: InventoryReserved, failure: Failure) -> PaymentFailed:
    """Compensation trigger: a capture that failed for good is a failed payment upstream."""
    return PaymentFailed(order_id=event.order_id, reason=f"{failure.reason}: {failure.error}")


@agent.on(InventoryReserved, on_failure=payment_error)
async def capture(event: InventoryReserved, ctx: Context[PaymentsDB]) -> PaymentCaptured | PaymentFailed | None:
    declined = event.total_cents > DECLINE_ABOVE_CENTS
    if not declined:
        charge_card(event.customer_id, event.total_cents)
    decision = {
        "status": "declined" if declined else "captured",
        "amount_cents": event.total_cents,
        "currency": event.currency,
    }
    if not ctx.state.decide_once("charges", event.order_id, ctx.event_id, decision):
        return None  # one charge per order, ever
    if declined:
        return PaymentFailed(order_id=event.order_id, reason=f"declined: {event.total_cents} > {DECLINE_ABOVE_CENTS}")
    return PaymentCaptured(
        order_id=event.order_id, country=event.country, amount_cents=event.total_cents, currency=event.currency
    )


@agent.on(ShippingFailed)
async def refund(event: ShippingFailed, ctx: Context[PaymentsDB]) -> PaymentRefunded | None:
    """Compensation: refund the capture of an order that cannot ship."""
    with ctx.state.transaction() as db:
        row = db.execute(
            "SELECT status, amount_cents, currency, refunded_by FROM charges WHERE order_id = ?", (event.order_id,)
        ).fetchone()
        if row is None:
            return None
        status, amount, currency, refunded_by = row
        if status == "captured":
            db.execute(
                "UPDATE charges SET status = 'refunded', refunded_by = ? WHERE order_id = ?",
                (ctx.event_id, event.order_id),
            )
        elif refunded_by != ctx.event_id:
            return None
    return PaymentRefunded(order_id=event.order_id, amount_cents=amount, currency=currency)
