"""The order saga end to end: the same scenario on the in-memory broker and on RabbitMQ."""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable

from agents.saga import ALL_SCENARIOS, EXPECTED_COMPENSATIONS, plan_orders, run_saga
from choreo import Settings
from choreo.transport import Transport

ORDERS = 240


async def test_every_order_ends_exactly_once_with_its_compensations(
    transport_factory: Callable[[], Awaitable[Transport]], settings: Settings
) -> None:
    transport = await transport_factory()
    plans = plan_orders(ORDERS, seed=11, scenarios=ALL_SCENARIOS)
    expected = collections.Counter(p.expected for p in plans)
    assert set(expected) == {"completed", "out_of_stock", "payment_declined", "shipping_failed"}
    refused = sum(p.scenario == "gateway_refused" for p in plans)
    assert refused > 0

    report = await run_saga(transport, settings, plans, timeout_s=120)

    assert report.problems == []
    assert report.completed == expected["completed"]
    assert dict(report.cancelled) == {k: v for k, v in expected.items() if k != "completed"}
    releases, refunds = (sum(EXPECTED_COMPENSATIONS[p.expected][i] for p in plans) for i in (0, 1))
    assert report.releases == releases == expected["payment_declined"] + expected["shipping_failed"]
    assert report.refunds == refunds == expected["shipping_failed"]
    # Re-published duplicates were suppressed, and the two injected bad messages dead-lettered.
    assert report.duplicates_published > 0
    assert report.duplicates_suppressed >= report.duplicates_published
    assert dict(report.dead_lettered) == {"signature": 1, "malformed": 1}
    assert len(report.latencies_ms) == ORDERS
    # Orders the card gateway refused were compensated through payments' failure event.
    assert report.compensated == {"payments": refused}
