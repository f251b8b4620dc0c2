"""Garbage at a live worker process: at least 1000 generated bad bodies, every one dead-lettered
with its precise reason and its body intact, good events between them all handled, no crash."""

from __future__ import annotations

import collections
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from choreo import Settings
from choreo.publisher import new_envelope
from choreo.signing import SIG_HEADER
from choreo.testing import wait_for
from choreo.topology import QueueSpec, Topology
from choreo.transport import OutgoingMessage
from choreo.transport.rabbitmq import RabbitMQTransport

from .conftest import WorkerProcess

pytestmark = pytest.mark.rabbitmq

MAX_BODY = 4096
EXAMPLES, BATCH = 5, 210  # 1050 bad bodies in all


@pytest.fixture
def worker_env() -> dict[str, str]:
    return {"CHOREO_MAX_BODY_BYTES": str(MAX_BODY)}


def good_envelope(order_id: str) -> dict[str, Any]:
    payload = {
        "order_id": order_id,
        "customer_id": "c-1",
        "country": "DE",
        "items": [{"sku": "sku-1", "qty": 1}],
        "total_cents": 100,
        "currency": "EUR",
    }
    return new_envelope("order.placed", payload, source="fuzz").to_wire()


REQUIRED = ["id", "type", "source", "issued_at", "trace_id", "payload"]
WRONG_VALUES: dict[str, list[Any]] = {
    "id": [123, "", "x" * 129, None, ["a"]],
    "type": ["Order.Placed", "order", "order..placed", 7, None],
    "source": ["", 5, None],
    "issued_at": ["yesterday", 1763632800, "2026-11-20", None, "2026-11-20T10:00:00"],
    "trace_id": ["XYZ", "4BF92F3577B34DA6A3CE929D0E0E4736", "0" * 31, 1],
    "ttl_ms": [0, -1, "100", 1.5],
    "payload": [[1, 2], "payload", 3, None],
}


@st.composite
def bad_message(draw: st.DrawFn) -> tuple[str, bytes, str]:
    """(expected reason, body, how to sign: "ok" or "bad")."""
    kind = draw(
        st.sampled_from(
            [
                "utf8",
                "json",
                "non_object",
                "missing",
                "mistyped",
                "unknown_type",
                "payload",
                "oversize",
                "signature",
                "expired",
            ]
        )
    )
    order_id = f"o-bad-{draw(st.uuids())}"
    if kind == "utf8":
        return "malformed", b"\xff" + draw(st.binary(max_size=200)), "ok"
    if kind == "json":
        return "malformed", ("{" + draw(st.text(max_size=200)) + ",,}").encode(), "ok"
    if kind == "non_object":
        value = draw(
            st.one_of(
                st.lists(st.integers(), max_size=5), st.integers(), st.text(max_size=50), st.none(), st.booleans()
            )
        )
        return "malformed", json.dumps(value).encode(), "ok"
    if kind == "oversize":
        return "malformed", json.dumps({"pad": "x" * draw(st.integers(MAX_BODY, MAX_BODY * 3))}).encode(), "ok"
    envelope = good_envelope(order_id)
    if kind == "missing":
        for field in draw(st.lists(st.sampled_from(REQUIRED), min_size=1, max_size=3, unique=True)):
            del envelope[field]
        return "schema", json.dumps(envelope).encode(), "ok"
    if kind == "mistyped":
        field = draw(st.sampled_from(sorted(WRONG_VALUES)))
        envelope[field] = draw(st.sampled_from(WRONG_VALUES[field]))
        return "schema", json.dumps(envelope).encode(), "ok"
    if kind == "unknown_type":
        envelope["type"] = draw(st.sampled_from(["order.exploded", "thing.happened", "a.b.c"]))
        return "unknown_type", json.dumps(envelope).encode(), "ok"
    if kind == "payload":
        payload = envelope["payload"]
        choice = draw(st.sampled_from(["drop", "items", "country", "total"]))
        if choice == "drop":
            del payload["order_id"]
        elif choice == "items":
            payload["items"] = draw(st.sampled_from([[], [{"sku": ""}], "none", [{"sku": "a", "qty": 0}]]))
        elif choice == "country":
            payload["country"] = draw(st.sampled_from(["", "DEU", 49]))
        else:
            payload["total_cents"] = draw(st.sampled_from([-1, "a hundred", None]))  # "100" would coerce
        return "schema", json.dumps(envelope).encode(), "ok"
    if kind == "expired":
        envelope["issued_at"] = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        envelope["ttl_ms"] = draw(st.integers(1, 60_000))
        return "expired", json.dumps(envelope).encode(), "ok"
    return "signature", json.dumps(envelope).encode(), "bad"


def message(body: bytes, sign: str, settings: Settings, rng_sig: str) -> OutgoingMessage:
    headers: dict[str, Any] = dict(settings.keyring.sign(body))
    if sign == "bad":
        headers[SIG_HEADER] = rng_sig
    return OutgoingMessage(exchange=settings.naming.exchange, routing_key="order.placed", body=body, headers=headers)


@pytest.mark.filterwarnings("ignore:Generating overly large repr")
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    phases=[Phase.generate],  # each example is a live run: report failures as generated, unshrunk
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(batch=st.lists(bad_message(), min_size=BATCH, max_size=BATCH), sig=st.binary(min_size=32, max_size=32))
async def test_generated_bad_bodies_are_dead_lettered_and_good_ones_handled(
    batch: list[tuple[str, bytes, str]],
    sig: bytes,
    workers: Callable[[str], Awaitable[WorkerProcess]],
    rabbit_factory: Callable[[], Awaitable[RabbitMQTransport]],
    settings: Settings,
) -> None:
    # Fixtures are shared by the examples: one live worker takes every batch.
    state = _STATE.setdefault(id(settings), {})
    if "worker" not in state:
        state["worker"] = await workers("agents.inventory:agent")
        state["transport"] = transport = await rabbit_factory()
        state["sink"] = sink = f"{settings.naming.queue_prefix}sink"
        await transport.declare(Topology(settings.naming.exchange, (QueueSpec(sink, {}, ("inventory.*",)),)))
    worker: WorkerProcess = state["worker"]
    transport: RabbitMQTransport = state["transport"]
    sink: str = state["sink"]
    dlq = settings.naming.agent_queues("inventory").dlq

    expected: collections.Counter[tuple[bytes, str]] = collections.Counter()
    good_ids: list[str] = []
    for i, (reason, body, sign) in enumerate(batch):
        await transport.publish(message(body, sign, settings, sig.hex()))
        expected[(body, reason)] += 1
        if i % 20 == 0:  # good events interleaved with the garbage
            envelope = good_envelope(f"o-good-{len(good_ids)}-{sig.hex()[:8]}")
            good_ids.append(envelope["id"])
            await transport.publish(message(json.dumps(envelope).encode(), "ok", settings, ""))

    got: collections.Counter[tuple[bytes, str]] = collections.Counter()
    handled: list[str] = []

    async def accounted() -> bool:
        while (dead := await transport.get(dlq)) is not None:
            got[(dead.body, str(dead.headers.get("x-choreo-reason")))] += 1
            await dead.ack()
        while (out := await transport.get(sink)) is not None:
            handled.append(str(out.message_id))
            await out.ack()
        return sum(got.values()) >= len(batch) and len(handled) >= len(good_ids)

    await wait_for(accounted, within=60, what=f"{len(batch)} dead-letters and {len(good_ids)} handled events")
    assert got == expected  # every bad body, intact, with its precise reason; nothing else
    assert len(handled) == len(good_ids)
    assert worker.proc is not None
    assert worker.proc.returncode is None, "the worker crashed"
    state["total"] = state.get("total", 0) + len(batch)
    print(f"\nbad input: tried={state['total']} dead_lettered_so_far={state['total']} good_handled+={len(handled)}")
    log = worker.log.read_text()
    assert "Traceback" not in log
    assert "unexpected error" not in log


_STATE: dict[int, dict[str, Any]] = {}
