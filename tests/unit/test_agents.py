"""The saga's agents as plain functions: rules, compensations, and safety under redelivery."""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents import inventory, orders, payments, shipping
from agents._db import AgentDB
from agents.events import (
    InventoryRejected,
    InventoryReleased,
    InventoryReserved,
    Item,
    OrderCancelled,
    OrderCompleted,
    OrderPlaced,
    PaymentCaptured,
    PaymentFailed,
    PaymentRefunded,
    ShipmentScheduled,
    ShippingFailed,
)
from choreo import Event
from choreo.testing import call


def placed(order_id: str = "o-1", *, sku: str = "sku-1", total: int = 1000, country: str = "DE") -> OrderPlaced:
    return OrderPlaced(
        order_id=order_id,
        customer_id="c-1",
        country=country,
        items=[Item(sku=sku, qty=2)],
        total_cents=total,
        currency="EUR",
    )


@pytest.mark.parametrize("db_class", [inventory.InventoryDB, orders.OrdersDB, payments.PaymentsDB, shipping.ShippingDB])
def test_agent_tables_keep_rows_in_their_key_b_tree(tmp_path: Path, db_class: type[AgentDB]) -> None:
    """WITHOUT ROWID: one B-tree per table, so each decision's commit writes one page fewer."""
    db = db_class(tmp_path / "state.sqlite3")
    try:
        tables = db.db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall()
        assert tables
        for name, sql in tables:
            assert sql.rstrip().upper().endswith("WITHOUT ROWID"), (name, sql)
            with pytest.raises(sqlite3.OperationalError, match="rowid"):
                db.db.execute(f"SELECT rowid FROM {name}")
    finally:
        db.close()


async def test_inventory_reserves_rejects_and_releases(tmp_path: Path) -> None:
    db = inventory.InventoryDB(tmp_path / "inv.sqlite3")
    assert await call(inventory.agent, placed("o-1"), state=db, event_id="e1") == [
        InventoryReserved(order_id="o-1", customer_id="c-1", country="DE", total_cents=1000, currency="EUR")
    ]
    assert await call(inventory.agent, placed("o-2", sku="oos-9"), state=db, event_id="e2") == [
        InventoryRejected(order_id="o-2", out_of_stock=["oos-9"])
    ]
    failed = PaymentFailed(order_id="o-1", reason="declined")
    assert await call(inventory.agent, failed, state=db, event_id="f1") == [InventoryReleased(order_id="o-1")]
    # A redelivery of the same failure re-emits the same release; another failure event releases nothing.
    assert await call(inventory.agent, failed, state=db, event_id="f1") == [InventoryReleased(order_id="o-1")]
    assert await call(inventory.agent, ShippingFailed(order_id="o-1", reason="x"), state=db, event_id="f2") == []
    # A rejected order has nothing to release.
    assert await call(inventory.agent, PaymentFailed(order_id="o-2", reason="x"), state=db, event_id="f3") == []
    db.close()


async def test_inventory_decides_each_order_once(tmp_path: Path) -> None:
    db = inventory.InventoryDB(tmp_path / "inv.sqlite3")
    first = await call(inventory.agent, placed("o-1"), state=db, event_id="e1")
    assert await call(inventory.agent, placed("o-1"), state=db, event_id="e1") == first  # redelivery
    assert await call(inventory.agent, placed("o-1"), state=db, event_id="e-other") == []  # same order again
    db.close()


async def test_payments_captures_once_declines_and_refunds(tmp_path: Path) -> None:
    db = payments.PaymentsDB(tmp_path / "pay.sqlite3")
    reserved = InventoryReserved(order_id="o-1", country="DE", total_cents=50_000, currency="EUR")
    captured = await call(payments.agent, reserved, state=db, event_id="r1")
    assert captured == [PaymentCaptured(order_id="o-1", country="DE", amount_cents=50_000, currency="EUR")]
    assert await call(payments.agent, reserved, state=db, event_id="r-dup") == []  # never a second capture
    rows = db.db.execute("SELECT COUNT(*) FROM charges WHERE order_id = 'o-1'").fetchone()
    assert rows == (1,)

    big = InventoryReserved(order_id="o-2", country="DE", total_cents=50_001, currency="EUR")
    (failed,) = await call(payments.agent, big, state=db, event_id="r2")
    assert isinstance(failed, PaymentFailed)

    refund = await call(payments.agent, ShippingFailed(order_id="o-1", reason="x"), state=db, event_id="s1")
    assert refund == [PaymentRefunded(order_id="o-1", amount_cents=50_000, currency="EUR")]
    assert await call(payments.agent, ShippingFailed(order_id="o-2", reason="x"), state=db, event_id="s2") == []
    db.close()


async def test_payments_refused_card_is_permanent_and_maps_to_payment_failed(tmp_path: Path) -> None:
    db = payments.PaymentsDB(tmp_path / "pay.sqlite3")
    reserved = InventoryReserved(
        order_id="o-9", customer_id="c-blocked-1", country="DE", total_cents=10, currency="EUR"
    )
    with pytest.raises(payments.GatewayRefusedError):
        await call(payments.agent, reserved, state=db)
    assert db.db.execute("SELECT COUNT(*) FROM charges").fetchone() == (0,)  # nothing captured
    assert payments.agent.retry.is_permanent(payments.GatewayRefusedError("x"))
    spec = payments.agent.handler_for("inventory.reserved")
    assert spec is not None
    assert spec.on_failure is payments.payment_error
    db.close()


async def test_shipping_fails_for_country_xx(tmp_path: Path) -> None:
    db = shipping.ShippingDB(tmp_path / "ship.sqlite3")
    ok = PaymentCaptured(order_id="o-1", country="DE", amount_cents=1, currency="EUR")
    assert await call(shipping.agent, ok, state=db) == [ShipmentScheduled(order_id="o-1", shipment_id="shp-o-1")]
    bad = PaymentCaptured(order_id="o-2", country="XX", amount_cents=1, currency="EUR")
    (failed,) = await call(shipping.agent, bad, state=db)
    assert isinstance(failed, ShippingFailed)
    db.close()


async def test_orders_completes_once(tmp_path: Path) -> None:
    db = orders.OrdersDB(tmp_path / "orders.sqlite3")
    scheduled = ShipmentScheduled(order_id="o-1", shipment_id="s")
    assert await call(orders.agent, scheduled, state=db, event_id="s1") == [OrderCompleted(order_id="o-1")]
    assert await call(orders.agent, scheduled, state=db, event_id="s1") == [OrderCompleted(order_id="o-1")]
    assert await call(orders.agent, scheduled, state=db, event_id="s2") == []
    db.close()


FAILURES: dict[str, list[Event]] = {
    "out_of_stock": [InventoryRejected(order_id="o-1", out_of_stock=["oos-1"])],
    "payment_declined": [PaymentFailed(order_id="o-1", reason="declined"), InventoryReleased(order_id="o-1")],
    "shipping_failed": [
        ShippingFailed(order_id="o-1", reason="XX"),
        InventoryReleased(order_id="o-1"),
        PaymentRefunded(order_id="o-1", amount_cents=1, currency="EUR"),
    ],
}


@pytest.mark.parametrize("reason", sorted(FAILURES))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_orders_cancels_exactly_once_in_any_order_with_redeliveries(reason: str, data: st.DataObject) -> None:
    events = FAILURES[reason]
    order = data.draw(st.permutations(range(len(events))), label="arrival order")
    # Redeliveries: any event may arrive again (same id) at any later point.
    replays = data.draw(st.lists(st.integers(0, len(events) - 1), max_size=4), label="redelivered")
    deliveries = list(order)
    for index in replays:
        position = data.draw(st.integers(deliveries.index(index) + 1, len(deliveries)), label="at")
        deliveries.insert(position, index)

    async def scenario() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            db = orders.OrdersDB(Path(tmp) / "orders.sqlite3")
            last_emitted: dict[str, list[Event]] = {}
            seen: set[int] = set()
            for index in deliveries:
                emitted = await call(orders.agent, events[index], state=db, event_id=f"e{index}")
                seen.add(index)
                if emitted:
                    # Never before every required compensation has arrived.
                    assert seen == set(range(len(events))), f"cancelled early after {sorted(seen)}"
                last_emitted[f"e{index}"] = emitted
            deciders = [eid for eid, emitted in last_emitted.items() if emitted]
            assert len(deciders) == 1, f"cancelled by {deciders}"
            assert last_emitted[deciders[0]] == [OrderCancelled(order_id="o-1", reason=reason)]  # type: ignore[arg-type]
            db.close()

    asyncio.run(scenario())
