"""The saga's events. Every payload carries ``order_id``. JSON Schemas live in ``schemas/``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from choreo import Event

CancelReason = Literal["out_of_stock", "payment_declined", "shipping_failed"]


class Item(BaseModel):
    sku: Annotated[str, Field(min_length=1)]
    qty: Annotated[int, Field(ge=1)]


class OrderPlaced(Event, type="order.placed"):
    order_id: str
    customer_id: str
    country: Annotated[str, Field(min_length=2, max_length=2)]
    items: Annotated[list[Item], Field(min_length=1)]
    total_cents: Annotated[int, Field(ge=0)]
    currency: Annotated[str, Field(min_length=3, max_length=3)]


class InventoryReserved(Event, type="inventory.reserved"):
    order_id: str
    customer_id: str = ""
    country: str
    total_cents: int
    currency: str


class InventoryRejected(Event, type="inventory.rejected"):
    order_id: str
    out_of_stock: list[str]


class InventoryReleased(Event, type="inventory.released"):
    order_id: str


class PaymentCaptured(Event, type="payment.captured"):
    order_id: str
    country: str
    amount_cents: int
    currency: str


class PaymentFailed(Event, type="payment.failed"):
    order_id: str
    reason: str


class PaymentRefunded(Event, type="payment.refunded"):
    order_id: str
    amount_cents: int
    currency: str


class ShipmentScheduled(Event, type="shipment.scheduled"):
    order_id: str
    shipment_id: str


class ShippingFailed(Event, type="shipping.failed"):
    order_id: str
    reason: str


class OrderCompleted(Event, type="order.completed"):
    order_id: str


class OrderCancelled(Event, type="order.cancelled"):
    order_id: str
    reason: CancelReason


ALL_EVENTS: tuple[type[Event], ...] = (
    OrderPlaced,
    InventoryReserved,
    InventoryRejected,
    InventoryReleased,
    PaymentCaptured,
    PaymentFailed,
    PaymentRefunded,
    ShipmentScheduled,
    ShippingFailed,
    OrderCompleted,
    OrderCancelled,
)
