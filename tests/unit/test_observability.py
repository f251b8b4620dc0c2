"""Metrics, health endpoints, log binding, heartbeats and traces, on the in-memory broker."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
import structlog
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import choreo
from agents.saga import SagaRun, plan_orders
from choreo.log import debug_enabled, merge_message_fields
from choreo.observability import tracing
from choreo.observability.heartbeat import LatencyWindow, collect, control_exchange
from choreo.observability.metrics import METRIC_NAMES, Metrics
from choreo.publisher import new_envelope, to_message, traceparent
from choreo.testing import wait_for
from choreo.transport import InMemoryBroker, InMemoryTransport


class Ping(choreo.Event, type="obs.ping"):
    n: int


class Pong(choreo.Event, type="obs.pong"):
    n: int


def ping_agent(fail_on: int | None = None) -> choreo.Agent[None]:
    agent: choreo.Agent[None] = choreo.Agent("pinger", retry_tiers_s=())

    @agent.on(Ping, retry=choreo.RetryPolicy(attempts=1))
    async def on_ping(event: Ping, ctx: choreo.Context[None]) -> Pong:
        structlog.get_logger("user-handler").info("handler says hi", n=event.n)
        if event.n == fail_on:
            raise choreo.Reject("refused on purpose")
        return Pong(n=event.n)

    return agent


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split(" ")[1]), body


def sample(exposition: str, name: str, **labels: str) -> float | None:
    """The value of one sample in a Prometheus text exposition, or None."""
    for line in exposition.splitlines():
        if not line.startswith(name + "{") and line.split(" ")[0] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.fixture
async def running(settings: choreo.Settings) -> AsyncIterator[tuple[choreo.Worker, InMemoryTransport, int]]:
    broker = InMemoryBroker()
    transport = broker.transport()
    await transport.connect()
    worker = choreo.Worker(
        [ping_agent(fail_on=13)],
        settings=replace(settings, http_port=0, heartbeat_s=0.05),
        transport=transport,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop, handle_signals=False))
    await wait_for(worker.is_ready, within=5, what="worker ready")
    assert worker.http is not None
    yield worker, transport, worker.http.port
    stop.set()
    assert await task
    await transport.close()


async def publish(transport: InMemoryTransport, settings: choreo.Settings, n: int, **kw: Any) -> choreo.Envelope:
    envelope = new_envelope("obs.ping", {"n": n}, source="test", **kw)
    await transport.publish(to_message(envelope, settings.keyring, settings.naming.exchange))
    return envelope


async def test_metrics_count_handled_failed_duplicates_and_dead_letters(
    running: tuple[choreo.Worker, InMemoryTransport, int], settings: choreo.Settings
) -> None:
    worker, transport, port = running
    first = await publish(transport, settings, 1)
    await transport.publish(to_message(first, settings.keyring, settings.naming.exchange))  # duplicate
    await publish(transport, settings, 13)  # rejected by the handler
    bad = to_message(new_envelope("obs.ping", {"n": 2}, source="test"), settings.keyring, settings.naming.exchange)
    bad.headers["x-choreo-sig"] = "00" * 32
    await transport.publish(bad)
    stray = new_envelope("not.ours", {}, source="test")
    await transport.publish(
        replace(to_message(stray, settings.keyring, settings.naming.exchange), routing_key="obs.ping")
    )
    runtime = worker.runtimes[0]
    await wait_for(lambda: runtime.stats.received == 5, within=5, what="5 deliveries")
    await wait_for(lambda: runtime.in_flight == 0, within=5, what="all settled")

    status, text = await http_get(port, "/metrics")
    assert status == 200
    one = {"agent": "pinger", "type": "obs.ping"}
    assert sample(text, "choreo_messages_handled_total", **one) == 1
    assert sample(text, "choreo_duplicates_suppressed_total", **one) == 1
    assert sample(text, "choreo_messages_failed_total", **one) == 1
    assert sample(text, "choreo_messages_dead_lettered_total", agent="pinger", reason="signature") == 1
    assert sample(text, "choreo_messages_dead_lettered_total", agent="pinger", reason="handler_error") == 1
    assert sample(text, "choreo_messages_dead_lettered_total", agent="pinger", reason="unknown_type") == 1
    assert sample(text, "choreo_handler_duration_seconds_count", **one) == 2  # n=1 and n=13
    assert sample(text, "choreo_publish_confirm_seconds_count", agent="pinger") == 1
    assert sample(text, "choreo_consumers_attached", agent="pinger") == 1
    assert sample(text, "choreo_messages_in_flight", agent="pinger") == 0
    assert sample(text, "choreo_ready") == 1
    # Labels stay bounded: a type the agent does not handle is counted as "other".
    assert "not.ours" not in text
    assert sample(text, "choreo_messages_received_total", agent="pinger", type="other") == 1
    assert sample(text, "choreo_messages_received_total", **one) == 4
    # Every family we promise is exposed (dashboards are checked against this set).
    exposed = {line.split(" ")[2] for line in text.splitlines() if line.startswith("# TYPE choreo_")}
    assert exposed == METRIC_NAMES


async def test_healthz_and_readyz_follow_the_consumer(running: tuple[choreo.Worker, InMemoryTransport, int]) -> None:
    worker, _, port = running
    assert await http_get(port, "/healthz") == (200, "ok\n")
    status, body = await http_get(port, "/readyz")
    assert status == 200
    assert '"consumers_attached":{"pinger":true}' in body
    # The broker cancels the consumer (queue deleted, node lost...): not ready, and says why.
    sub = worker.runtimes[0]._sub
    assert sub is not None
    await sub.cancel()
    status, body = await http_get(port, "/readyz")
    assert status == 503
    assert '"pinger":false' in body
    assert (await http_get(port, "/healthz"))[0] == 200  # alive all the same
    assert (await http_get(port, "/nope"))[0] == 404


async def test_message_logs_carry_event_fields(
    running: tuple[choreo.Worker, InMemoryTransport, int], settings: choreo.Settings
) -> None:
    worker, transport, _ = running
    with structlog.testing.capture_logs(processors=[merge_message_fields]) as logs:
        envelope = await publish(transport, settings, 13, causation_id="cause-1")
        await wait_for(lambda: worker.runtimes[0].stats.dead_lettered_total == 1, within=5, what="dead-letter")
    expected = {
        "agent": "pinger",
        "event_type": "obs.ping",
        "event_id": envelope.id,
        "trace_id": envelope.trace_id,
        "causation_id": "cause-1",
    }
    about = [e for e in logs if e.get("event") in {"handler says hi", "handler failed", "dead-lettered"}]
    assert {e["event"] for e in about} == {"handler says hi", "handler failed", "dead-lettered"}
    for entry in about:  # the framework's lines and the handler's own
        assert {k: entry.get(k) for k in expected} == expected, entry


def test_debug_enabled_reads_the_configured_level() -> None:
    saved = structlog.get_config()
    try:
        choreo.log.configure(json=True, level=logging.INFO)
        assert debug_enabled(choreo.log.get_logger("t")) is False
        choreo.log.configure(json=True, level=logging.DEBUG)
        assert debug_enabled(choreo.log.get_logger("t")) is True
    finally:
        structlog.configure(**saved)

    class Odd:
        def is_enabled_for(self) -> bool:  # another signature: cannot tell
            return False

    assert debug_enabled(object()) is True  # a logger that does not filter by level
    assert debug_enabled(Odd()) is True


@pytest.mark.parametrize("level", [logging.DEBUG, logging.INFO])
async def test_per_message_debug_lines_follow_the_level_read_at_start(
    settings: choreo.Settings, level: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved = structlog.get_config()
    choreo.log.configure(json=True, level=level)
    # A module's logger keeps the configuration of its first use (cache_logger_on_first_use):
    # a fresh one sees this test's level.
    monkeypatch.setattr("choreo.runtime.log", structlog.get_logger("choreo.runtime"))
    transport = InMemoryBroker().transport()
    await transport.connect()
    worker = choreo.Worker([ping_agent()], settings=settings, transport=transport)
    try:
        with structlog.testing.capture_logs() as logs:
            await worker.start()
            first = await publish(transport, settings, 1)
            await transport.publish(to_message(first, settings.keyring, settings.naming.exchange))  # duplicate
            runtime = worker.runtimes[0]
            await wait_for(lambda: runtime.stats.handled + runtime.stats.duplicates == 2, within=5, what="both")
            await worker.stop()
    finally:
        structlog.configure(**saved)
        await transport.close()
    lines = {e["event"] for e in logs if e["log_level"] == "debug"}
    assert lines == ({"handled", "duplicate suppressed"} if level == logging.DEBUG else set())


async def test_heartbeats_list_live_agents(
    running: tuple[choreo.Worker, InMemoryTransport, int], settings: choreo.Settings
) -> None:
    worker, transport, _ = running
    await publish(transport, settings, 1)
    await wait_for(lambda: worker.runtimes[0].stats.handled == 1, within=5, what="handled")
    seen = await collect(transport, settings.naming, settings.keyring, wait_s=0.3)
    assert len(seen) == 1
    beat = seen[0].heartbeat
    assert seen[0].verified
    assert beat["agent"] == "pinger"
    assert beat["types"] == ["obs.ping"]
    assert beat["ready"] is True
    assert beat["handled"] == 1
    assert beat["version"] == choreo.__version__
    assert beat["latency_ms"]["p50"] is not None
    assert ":" in beat["instance"]
    assert control_exchange(settings.naming) == f"{settings.naming.exchange}.control"


def test_latency_window_percentiles() -> None:
    window = LatencyWindow(size=100)
    assert window.percentiles_ms() == {"p50": None, "p99": None}
    for ms in range(1, 201):  # only the last 100 count
        window.add(ms / 1000)
    assert window.percentiles_ms() == {"p50": 151.0, "p99": 200.0}


def test_metric_registries_do_not_clash() -> None:
    a, b = Metrics(), Metrics()  # two workers in one process
    a.for_agent("x", ["t"]).count_handled("t")
    assert sample(a.exposition().decode(), "choreo_messages_handled_total", agent="x", type="t") == 1
    assert sample(b.exposition().decode(), "choreo_messages_handled_total", agent="x", type="t") is None


def test_histograms_expose_cumulative_buckets_count_and_sum() -> None:
    metrics = Metrics()
    agent = metrics.for_agent("x", ["t"])
    for seconds in (0.003, 0.005, 0.2, 99.0):  # 0.005 sits on a bound: le means <=
        agent.handler_seconds("t", seconds)
    agent.confirm_seconds(0.0004)
    text = metrics.exposition().decode()
    bucket = "choreo_handler_duration_seconds_bucket"
    assert sample(text, bucket, agent="x", type="t", le="0.0025") == 0
    assert sample(text, bucket, agent="x", type="t", le="0.005") == 2
    assert sample(text, bucket, agent="x", type="t", le="0.25") == 3
    assert sample(text, bucket, agent="x", type="t", le="30.0") == 3
    assert sample(text, bucket, agent="x", type="t", le="+Inf") == 4
    assert sample(text, "choreo_handler_duration_seconds_count", agent="x", type="t") == 4
    assert sample(text, "choreo_handler_duration_seconds_sum", agent="x", type="t") == pytest.approx(99.208)
    assert sample(text, bucket, agent="x", type="other", le="+Inf") == 0
    assert sample(text, "choreo_publish_confirm_seconds_bucket", agent="x", le="0.0005") == 1


# traces -----------------------------------------------------------------------------------------
# ``spans`` (tests/conftest.py): choreo traced into an in-memory exporter.


def test_tracing_is_off_without_configuration() -> None:
    assert tracing.current() is None
    assert tracing.configure_from_env("x", environ={}) is False
    assert tracing.configure_from_env("x", environ={"OTEL_TRACES_EXPORTER": "none"}) is False
    assert (
        tracing.configure_from_env("x", environ={"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}) is False
    )


async def test_one_saga_is_one_trace_with_parent_links(spans: InMemorySpanExporter, settings: choreo.Settings) -> None:
    transport = InMemoryBroker().transport()
    await transport.connect()
    plans = plan_orders(6, seed=5)
    async with SagaRun(transport, replace(settings, heartbeat_s=0), plans) as run:
        await run.publish_all(duplicate_every=0, inject_bad=False)
        await run.wait(timeout_s=20)
    report = run.finish()
    await transport.close()
    assert report.ok, report.problems

    finished: list[ReadableSpan] = list(spans.get_finished_spans())
    by_trace: dict[int, list[ReadableSpan]] = {}
    for span in finished:
        assert span.context is not None
        by_trace.setdefault(span.context.trace_id, []).append(span)
    assert len(by_trace) == len(plans)  # one trace per order, nothing else
    by_id = {s.context.span_id: s for s in finished if s.context is not None}
    all_agents: set[object] = set()
    for trace_spans in by_trace.values():
        consumes = [s for s in trace_spans if s.kind is SpanKind.CONSUMER]
        publishes = [s for s in trace_spans if s.kind is SpanKind.PRODUCER]
        handles = [s for s in trace_spans if s.name.startswith("handle ")]
        agents_seen = {s.attributes["choreo.agent"] for s in consumes if s.attributes}
        assert {"inventory", "orders", "auditor"} <= agents_seen  # every order crosses these
        all_agents |= agents_seen
        # Every consume is the child of a publish span: the shop's for order.placed, otherwise
        # one made by the upstream agent while it handled (a child of its consume span).
        roots = 0
        for consume in consumes:
            assert consume.parent is not None
            parent = by_id.get(consume.parent.span_id)
            assert parent is not None, consume.name
            assert parent.kind is SpanKind.PRODUCER, consume.name
            grand = by_id.get(parent.parent.span_id) if parent.parent else None
            if consume.attributes and consume.attributes.get("choreo.event_type") == "order.placed":
                assert grand is None  # the shop's publish starts the trace
                roots += 1
            else:
                assert grand is not None, consume.name
                assert grand.kind is SpanKind.CONSUMER, consume.name
        assert roots == 1  # order.placed is consumed by inventory alone
        for handle in handles:
            assert handle.parent is not None
            assert by_id[handle.parent.span_id].kind is SpanKind.CONSUMER
        assert publishes
    assert all_agents == {"inventory", "payments", "shipping", "orders", "auditor"}


def test_traceparent_is_w3c_with_a_fresh_parent_id() -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    values = [traceparent(trace_id) for _ in range(200)]
    assert all(re.fullmatch(rf"00-{trace_id}-[0-9a-f]{{16}}-01", v) for v in values), values[:3]
    assert len(set(values)) == 200


def test_traceparent_never_has_the_invalid_all_zero_parent_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("choreo.publisher._getrandbits", lambda bits: 0)
    assert traceparent("4bf92f3577b34da6a3ce929d0e0e4736").split("-")[2] == "0000000000000001"


def test_to_message_maps_each_envelope_field_to_its_property() -> None:
    keyring = choreo.Keyring.hmac(("k1", "secret"))
    envelope = new_envelope("t.mapped", {"n": 1}, source="test", correlation_id="saga-1", ttl_ms=1_000)
    message = to_message(envelope, keyring, "the.exchange", expiration_slack_ms=250)
    assert (message.exchange, message.routing_key, message.type) == ("the.exchange", "t.mapped", "t.mapped")
    assert (message.message_id, message.correlation_id) == (envelope.id, "saga-1")
    assert message.body == envelope.encode()
    assert message.expiration_ms == 1_250
    assert message.mandatory is False
    keyring.verify(message.body, message.headers)
    long_id = "\u00e9" * 128  # valid in the body; 256 bytes, too long for a short-string property
    unsendable = to_message(new_envelope("t.mapped", {}, source="test", id=long_id), keyring, "e")
    assert unsendable.message_id is None


@pytest.mark.parametrize(("count", "kept"), [(63, True), (64, False)])
def test_to_message_drops_ids_over_255_bytes_at_the_short_cut_boundary(count: int, kept: bool) -> None:
    """63 four-byte characters are 252 bytes, 64 are 256: the length short cut must not keep them."""
    value = "\U0001f600" * count
    keyring = choreo.Keyring.hmac(("k1", "secret"))
    message = to_message(new_envelope("t.mapped", {}, source="test", id=value, correlation_id=value), keyring, "e")
    assert (message.message_id, message.correlation_id) == ((value, value) if kept else (None, None))
