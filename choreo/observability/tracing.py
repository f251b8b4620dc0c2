"""OpenTelemetry spans for the message path. The only module that imports opentelemetry.

Spans: ``consume <queue>`` (CONSUMER) per delivery, ``handle <type>`` per handler try under it,
and ``publish <type>`` (PRODUCER) per emitted event, whose context travels in the W3C
``traceparent`` header, so the next agent's consume span is its child and one saga is one trace.
The trace id is always the envelope's ``trace_id`` (the wire format says the body wins): when
``traceparent`` is missing or names another trace (a producer that does not trace), the
consume span hangs off a remote parent built from ``trace_id``.

Off unless configured: :func:`configure_from_env` installs an SDK tracer provider only when the
standard ``OTEL_*`` variables ask for an exporter; otherwise :func:`current` returns None and
the message path makes no tracing calls at all.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import (
    NonRecordingSpan,
    ProxyTracerProvider,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TracerProvider,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ..log import get_logger

__all__ = ["ConsumeSpan", "Tracing", "configure_from_env", "current", "set_tracer_provider"]

log = get_logger("choreo.tracing")
_propagator = TraceContextTextMapPropagator()
_override: dict[str, TracerProvider | None] = {"provider": None}
_cache: dict[int, Tracing] = {}


def set_tracer_provider(provider: TracerProvider | None) -> None:
    """Trace choreo with ``provider`` (e.g. an in-memory exporter in tests) instead of the
    global one; None goes back to the global provider. Read when workers and publishers start."""
    _override["provider"] = provider


def current() -> Tracing | None:
    """Tracing on the configured provider, or None when tracing is off (no provider set)."""
    provider = _override["provider"] or trace.get_tracer_provider()
    if isinstance(provider, (ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None
    tracing = _cache.get(id(provider))
    if tracing is None or tracing.provider is not provider:
        tracing = _cache[id(provider)] = Tracing(provider)
    return tracing


def _wanted_exporters(env: Mapping[str, str]) -> list[str]:
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return []
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if not names and (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        names = ["otlp"]  # an endpoint alone means "export there", as the SDK's own default would
    return [n for n in names if n != "none"]


def configure_from_env(service_name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Install a global SDK tracer provider if ``OTEL_TRACES_EXPORTER`` (otlp, console) or an
    OTLP endpoint is set. ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` name the
    service (default: ``service_name``); ``OTEL_BSP_*`` tune batching. True if tracing is on."""
    env = os.environ if environ is None else environ
    exporters = _wanted_exporters(env)
    if not exporters:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    attributes = {} if env.get("OTEL_SERVICE_NAME") else {"service.name": service_name}
    provider = SdkTracerProvider(resource=Resource.create(attributes))
    for name in exporters:
        exporter: SpanExporter
        if name == "otlp":
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            except ImportError:
                log.error("OTEL_TRACES_EXPORTER=otlp needs the otlp extra: pip install 'choreo[otlp]'")
                continue
            exporter = OTLPSpanExporter()  # endpoint, headers, timeout from OTEL_EXPORTER_OTLP_*
        elif name == "console":
            exporter = ConsoleSpanExporter()
        else:
            log.error("unknown OTEL_TRACES_EXPORTER; use otlp, console or none", exporter=name)
            continue
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    log.info("tracing on", exporters=exporters)
    return True


def _remote_parent(trace_id: str, seed: str) -> otel_context.Context:
    """A sampled remote parent in ``trace_id``; its span id is derived from ``seed`` (the
    event id), so every consumer of the same event hangs off the same parent."""
    span_id = int.from_bytes(hashlib.blake2b(seed.encode(), digest_size=8).digest(), "big") or 1
    parent = SpanContext(int(trace_id, 16), span_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return trace.set_span_in_context(NonRecordingSpan(parent))


def _header_text(headers: Mapping[str, object], name: str) -> str | None:
    value = headers.get(name)
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return value if isinstance(value, str) else None


def parent_context(headers: Mapping[str, object], trace_id: str | None, event_id: str) -> otel_context.Context:
    """The parent of a consume span: ``traceparent`` when it agrees with the body's trace id."""
    carrier = {k: v for k in ("traceparent", "tracestate") if (v := _header_text(headers, k)) is not None}
    ctx = _propagator.extract(carrier) if carrier else otel_context.Context()
    if trace_id is None:
        return ctx
    found = trace.get_current_span(ctx).get_span_context()
    if found.is_valid and found.trace_id == int(trace_id, 16):
        return ctx
    try:
        return _remote_parent(trace_id, event_id)
    except ValueError:  # not hex: the envelope validator rejects it anyway
        return ctx


class ConsumeSpan:
    """The span of one delivery, made current for the task handling it."""

    __slots__ = ("_span", "_token")

    def __init__(self, span: Span) -> None:
        self._span = span
        self._token = otel_context.attach(trace.set_span_in_context(span))

    def set(self, **attributes: Any) -> None:
        for key, value in attributes.items():
            if value is not None:
                self._span.set_attribute(key, value)

    def finish(self, outcome: str, error: str | None = None) -> None:
        self._span.set_attribute("choreo.outcome", outcome)
        if error is not None:
            self._span.set_status(Status(StatusCode.ERROR, error[:200]))
        self._span.end()
        otel_context.detach(self._token)


class Tracing:
    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("choreo")

    def consume(
        self,
        *,
        agent: str,
        queue: str,
        headers: Mapping[str, object],
        trace_id: str | None,
        event_id: str | None,
        start_ns: int,
    ) -> ConsumeSpan:
        parent = parent_context(headers, trace_id, event_id or "")
        span = self.tracer.start_span(
            f"consume {queue}",
            context=parent,
            kind=SpanKind.CONSUMER,
            start_time=start_ns,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.operation": "process",
                "messaging.destination.name": queue,
                "choreo.agent": agent,
            },
        )
        return ConsumeSpan(span)

    @contextmanager
    def handle(self, event_type: str, attempt: int) -> Iterator[None]:
        """A span around one handler try; an exception marks it failed and propagates."""
        with self.tracer.start_as_current_span(
            f"handle {event_type}", attributes={"choreo.event_type": event_type, "choreo.attempt": attempt}
        ):
            yield

    def publish(self, headers: dict[str, Any], routing_key: str, message_id: str | None, *, trace_id: str) -> Span:
        """Start a PRODUCER span under the current span (or, outside one, under ``trace_id``)
        and write its ``traceparent`` into ``headers``. The caller ends it after the confirm."""
        ctx: otel_context.Context | None = None
        found = trace.get_current_span().get_span_context()
        if not (found.is_valid and found.trace_id == int(trace_id, 16)):
            ctx = _remote_parent(trace_id, message_id or routing_key)
        span = self.tracer.start_span(
            f"publish {routing_key}",
            context=ctx,
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.operation": "publish",
                "messaging.rabbitmq.destination.routing_key": routing_key,
                "messaging.message.id": message_id or "",
            },
        )
        carrier: dict[str, str] = {}
        _propagator.inject(carrier, context=trace.set_span_in_context(span))
        headers.update(carrier)
        return span

    @staticmethod
    def end(span: Span, error: BaseException | None = None) -> None:
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, repr(error)[:200]))
        span.end()

    @staticmethod
    def current_trace_id() -> str | None:
        """The active span's trace id (to adopt for a new root event), if there is one."""
        found = trace.get_current_span().get_span_context()
        return format(found.trace_id, "032x") if found.is_valid else None
