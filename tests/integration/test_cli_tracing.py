"""``choreo publish`` traces as ``choreo.Publisher`` does: one PRODUCER span per publish, whose
context is the message's ``traceparent``, ended with the error when the publish fails."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from click.testing import CliRunner, Result
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from choreo import Settings
from choreo.cli.publish import Unroutable, publish
from choreo.codec import loads_object
from choreo.testing import wait_for
from choreo.topology import QueueSpec, Topology
from choreo.transport.base import Delivery
from choreo.transport.rabbitmq import RabbitMQTransport

from .test_cli import cli_env, run_cli

pytestmark = pytest.mark.rabbitmq

PAYLOAD = '{"order_id": "o-1", "customer_id": "c-1", "country": "DE", "items": [{"sku": "sku-1", "qty": 1}], "total_cents": 1200, "currency": "EUR"}'  # noqa: E501
# Tracing is the in-memory provider's alone: nothing in the environment may switch on another.
NO_OTEL_ENV: dict[str, str | None] = {
    "OTEL_TRACES_EXPORTER": None,
    "OTEL_EXPORTER_OTLP_ENDPOINT": None,
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": None,
}


async def bound_queue(transport: RabbitMQTransport, settings: Settings, event_type: str) -> str:
    queue = f"{settings.naming.queue_prefix}traced"
    await transport.declare(Topology(settings.naming.exchange, (QueueSpec(queue, {}, (event_type,)),)))
    return queue


async def invoke_publish(settings: Settings, amqp_url: str, *args: str) -> Result:
    """``choreo publish ARGS`` in this process (so the in-memory exporter sees its spans), on a
    thread of its own: the command runs its own event loop."""
    env: dict[str, str | None] = {**cli_env(settings, amqp_url), **NO_OTEL_ENV}
    return await asyncio.to_thread(CliRunner().invoke, publish, list(args), env=env)


def traceparent_of(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}-01"


async def delivered(transport: RabbitMQTransport, queue: str) -> Delivery:
    got: list[Delivery] = []

    async def one() -> bool:
        delivery = await transport.get(queue)
        if delivery is not None:
            got.append(delivery)
        return bool(got)

    await wait_for(one, within=10, what=f"a message in {queue}")
    return got[0]


async def test_publish_opens_a_producer_span_whose_context_travels_with_the_message(
    spans: InMemorySpanExporter,
    rabbit_factory: Callable[[], Awaitable[RabbitMQTransport]],
    settings: Settings,
    amqp_url: str,
) -> None:
    observer = await rabbit_factory()
    queue = await bound_queue(observer, settings, "order.placed")

    result = await invoke_publish(settings, amqp_url, "order.placed", PAYLOAD)
    assert result.exit_code == 0, result.output
    event_id = result.output.strip()

    [span] = spans.get_finished_spans()
    assert span.name == "publish order.placed"
    assert span.kind is SpanKind.PRODUCER
    assert span.status.status_code is StatusCode.UNSET
    assert span.end_time is not None
    assert span.attributes is not None
    assert span.attributes["messaging.message.id"] == event_id
    assert span.attributes["messaging.rabbitmq.destination.routing_key"] == "order.placed"

    delivery = await delivered(observer, queue)
    await delivery.ack()
    body = loads_object(delivery.body)
    assert body["id"] == event_id
    assert delivery.headers["traceparent"] == traceparent_of(span)  # the span's, not a fresh one
    assert span.context is not None
    assert body["trace_id"] == f"{span.context.trace_id:032x}"  # the body's trace id, as the wire format says


async def test_a_failed_publish_ends_its_span_with_the_error(
    spans: InMemorySpanExporter,
    rabbit_factory: Callable[[], Awaitable[RabbitMQTransport]],
    settings: Settings,
    amqp_url: str,
) -> None:
    observer = await rabbit_factory()
    await observer.declare(Topology(settings.naming.exchange))  # the exchange, and nothing bound to the type

    result = await invoke_publish(settings, amqp_url, "nobody.listens", '{"n": 1}')
    assert result.exit_code == 1
    assert isinstance(result.exception, Unroutable)

    [span] = spans.get_finished_spans()
    assert span.name == "publish nobody.listens"
    assert span.kind is SpanKind.PRODUCER
    assert span.status.status_code is StatusCode.ERROR
    assert "unroutable" in (span.status.description or "")
    assert [event.name for event in span.events] == ["exception"]


def console_spans(stdout: str) -> tuple[list[str], list[dict[str, Any]]]:
    """The plain lines and the JSON spans OTEL_TRACES_EXPORTER=console wrote to stdout."""
    lines: list[str] = []
    found: list[dict[str, Any]] = []
    decoder = json.JSONDecoder()
    pos = 0
    while pos < len(stdout):
        if stdout[pos].isspace():
            pos += 1
        elif stdout[pos] == "{":
            span, pos = decoder.raw_decode(stdout, pos)
            found.append(span)
        else:
            end = stdout.find("\n", pos)
            end = len(stdout) if end < 0 else end
            lines.append(stdout[pos:end])
            pos = end
    return lines, found


async def test_otel_environment_turns_the_cli_publish_span_on(
    rabbit_factory: Callable[[], Awaitable[RabbitMQTransport]], settings: Settings, amqp_url: str
) -> None:
    observer = await rabbit_factory()
    queue = await bound_queue(observer, settings, "order.placed")
    env = {**cli_env(settings, amqp_url), "OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "shop-script"}

    code, out, err = await run_cli("publish", "order.placed", PAYLOAD, env=env)
    assert code == 0, err
    [event_id], [span] = console_spans(out)  # exported at exit, after the id
    assert span["name"] == "publish order.placed"
    assert span["kind"] == "SpanKind.PRODUCER"
    assert span["resource"]["attributes"]["service.name"] == "shop-script"

    delivery = await delivered(observer, queue)
    await delivery.ack()
    assert loads_object(delivery.body)["id"] == event_id
    trace_id, span_id = span["context"]["trace_id"], span["context"]["span_id"]  # "0x..." hex
    assert delivery.headers["traceparent"] == f"00-{trace_id[2:]}-{span_id[2:]}-01"
