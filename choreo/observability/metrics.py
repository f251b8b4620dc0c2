"""Prometheus metrics for workers. The only module that imports prometheus_client.

Labels are bounded: agent names, event types the agent handles (anything else is counted as
``other``), and fault reasons. Never ids: a label per event id would grow without bound.

Each :class:`Metrics` owns a registry, so several workers in one process (tests, the demo)
never clash; ``/metrics`` serves it together with the process-wide default registry (process
CPU and memory, and whatever the application registers itself).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

__all__ = ["CONTENT_TYPE", "METRIC_NAMES", "AgentMetrics", "Metrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
# ``*_created`` series double the exposition and say nothing a dashboard uses.
disable_created_metrics()  # type: ignore[no-untyped-call]
OTHER_TYPE = "other"

# Metric families as Prometheus exposes them (counters gain ``_total``, histograms ``_bucket``,
# ``_sum`` and ``_count``). Dashboards and alerts are checked against this set.
METRIC_NAMES = frozenset(
    {
        "choreo_messages_received_total",
        "choreo_messages_handled_total",
        "choreo_messages_failed_total",
        "choreo_messages_retried_total",
        "choreo_messages_dead_lettered_total",
        "choreo_messages_expired_total",
        "choreo_duplicates_suppressed_total",
        "choreo_handler_duration_seconds",
        "choreo_publish_confirm_seconds",
        "choreo_messages_in_flight",
        "choreo_consumers_attached",
        "choreo_ready",
    }
)

_HANDLER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_CONFIRM_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """The metric families of one worker, on their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        by_type = ["agent", "type"]
        self.received = Counter(
            "choreo_messages_received", "Deliveries taken from the agent's queue.", by_type, registry=r
        )
        self.handled = Counter(
            "choreo_messages_handled", "Events handled, emitted events confirmed, then acked.", by_type, registry=r
        )
        self.failed = Counter(
            "choreo_messages_failed", "Events whose handler failed after its in-process tries.", by_type, registry=r
        )
        self.retried = Counter(
            "choreo_messages_retried", "Handler re-runs: in-process tries and delayed retries.", by_type, registry=r
        )
        self.dead_lettered = Counter(
            "choreo_messages_dead_lettered",
            "Messages moved to the agent's DLQ, by reason.",
            ["agent", "reason"],
            registry=r,
        )
        self.expired = Counter(
            "choreo_messages_expired", "Events older than their ttl_ms (dead-lettered as expired).", by_type, registry=r
        )
        self.duplicates = Counter(
            "choreo_duplicates_suppressed", "Deliveries whose dedup key was already done.", by_type, registry=r
        )
        self.handler_duration = Histogram(
            "choreo_handler_duration_seconds",
            "Handler run time per try.",
            by_type,
            buckets=_HANDLER_BUCKETS,
            registry=r,
        )
        self.publish_confirm = Histogram(
            "choreo_publish_confirm_seconds",
            "From publishing a handler's emitted events to the broker's confirms.",
            ["agent"],
            buckets=_CONFIRM_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("choreo_messages_in_flight", "Deliveries being processed now.", ["agent"], registry=r)
        self.consumers = Gauge(
            "choreo_consumers_attached", "1 while the agent's consumer is attached to its queue.", ["agent"], registry=r
        )
        self.ready = Gauge("choreo_ready", "1 while the worker is connected and all consumers attached.", registry=r)

    def for_agent(self, agent: str, handled_types: Iterable[str]) -> AgentMetrics:
        return AgentMetrics(self, agent, handled_types)

    def exposition(self) -> bytes:
        """The text exposition of this worker's metrics, then the process-wide ones."""
        return generate_latest(self.registry) + generate_latest(REGISTRY)


class AgentMetrics:
    """One agent's children of the metric families, resolved once per event type so the
    message path does a dict lookup, not a label resolution."""

    def __init__(self, metrics: Metrics, agent: str, handled_types: Iterable[str]) -> None:
        self.agent = agent
        self._types = {*handled_types, OTHER_TYPE}
        m = metrics
        self._received = {t: m.received.labels(agent, t) for t in self._types}
        self._handled = {t: m.handled.labels(agent, t) for t in self._types}
        self._failed = {t: m.failed.labels(agent, t) for t in self._types}
        self._retried = {t: m.retried.labels(agent, t) for t in self._types}
        self._expired = {t: m.expired.labels(agent, t) for t in self._types}
        self._duplicates = {t: m.duplicates.labels(agent, t) for t in self._types}
        self._duration = {t: m.handler_duration.labels(agent, t) for t in self._types}
        self._dead_lettered = m.dead_lettered
        self._confirm = m.publish_confirm.labels(agent)
        self._in_flight = m.in_flight.labels(agent)
        self._consumers = m.consumers.labels(agent)

    def bounded(self, event_type: str | None) -> str:
        """``event_type`` if this agent handles it, else ``other`` (labels stay bounded)."""
        return event_type if event_type in self._types else OTHER_TYPE

    def received(self, event_type: str) -> None:
        self._received[event_type].inc()

    def handled(self, event_type: str) -> None:
        self._handled[event_type].inc()

    def failed(self, event_type: str) -> None:
        self._failed[event_type].inc()

    def retried(self, event_type: str, count: int = 1) -> None:
        if count:
            self._retried[event_type].inc(count)

    def expired(self, event_type: str) -> None:
        self._expired[event_type].inc()

    def duplicate(self, event_type: str) -> None:
        self._duplicates[event_type].inc()

    def dead_lettered(self, reason: str) -> None:
        self._dead_lettered.labels(self.agent, reason).inc()

    def handler_seconds(self, event_type: str, seconds: float) -> None:
        self._duration[event_type].observe(seconds)

    def confirm_seconds(self, seconds: float) -> None:
        self._confirm.observe(seconds)

    def track_in_flight(self, read: Callable[[], float]) -> None:
        """Read at scrape time: the message path pays nothing for this gauge."""
        self._in_flight.set_function(read)

    def set_attached(self, attached: bool) -> None:
        self._consumers.set(1 if attached else 0)
