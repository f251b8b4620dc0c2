"""Prometheus metrics for workers. The only module that imports prometheus_client.

Labels are bounded: agent names, event types the agent handles (anything else is counted as
``other``), and fault reasons. Never ids: a label per event id would grow without bound.

Each :class:`Metrics` owns a registry, so several workers in one process (tests, the demo)
never clash; ``/metrics`` serves it together with the process-wide default registry (process
CPU and memory, and whatever the application registers itself).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Gauge,
    Metric,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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


_BY_TYPE = ("agent", "type")
# (family, help, labels) of the counters; ``_total`` is added at exposition.
_COUNTERS = {
    "received": ("choreo_messages_received", "Deliveries taken from the agent's queue.", _BY_TYPE),
    "handled": ("choreo_messages_handled", "Events handled, emitted events confirmed, then acked.", _BY_TYPE),
    "failed": ("choreo_messages_failed", "Events whose handler failed after its in-process tries.", _BY_TYPE),
    "retried": ("choreo_messages_retried", "Handler re-runs: in-process tries and delayed retries.", _BY_TYPE),
    "dead_lettered": (
        "choreo_messages_dead_lettered",
        "Messages moved to the agent's DLQ, by reason.",
        ("agent", "reason"),
    ),
    "expired": ("choreo_messages_expired", "Events older than their ttl_ms (dead-lettered as expired).", _BY_TYPE),
    "duplicates": ("choreo_duplicates_suppressed", "Deliveries whose dedup key was already done.", _BY_TYPE),
}


class _Histogram:
    """Bucket counts in plain ints (cumulated at exposition)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for bound, count in zip((*map(floatToGoString, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            out.append((bound, float(total)))
        return out


class Metrics:
    """The metric families of one worker, on their own registry.

    Counters and histograms of the message path are plain integers in :class:`AgentMetrics`,
    read by a collector at scrape time: prometheus_client's own take a lock per increment,
    which cost more than the rest of the metrics work on a message. Single-threaded updates
    (the event loop) make plain integers exact.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self._agents: list[AgentMetrics] = []
        r.register(_MessageCollector(self._agents))
        self.in_flight = Gauge("choreo_messages_in_flight", "Deliveries being processed now.", ["agent"], registry=r)
        self.consumers = Gauge(
            "choreo_consumers_attached", "1 while the agent's consumer is attached to its queue.", ["agent"], registry=r
        )
        self.ready = Gauge("choreo_ready", "1 while the worker is connected and all consumers attached.", registry=r)

    def for_agent(self, agent: str, handled_types: Iterable[str]) -> AgentMetrics:
        metrics = AgentMetrics(self, agent, handled_types)
        self._agents.append(metrics)
        return metrics

    def exposition(self) -> bytes:
        """The text exposition of this worker's metrics, then the process-wide ones."""
        return generate_latest(self.registry) + generate_latest(REGISTRY)


class _MessageCollector(Collector):
    def __init__(self, agents: list[AgentMetrics]) -> None:
        self._agents = agents

    def describe(self) -> Iterable[Metric]:
        return []  # families are known only at collection (no duplicate-name checks needed)

    def collect(self) -> Iterable[Metric]:
        for attr, (name, text, labels) in _COUNTERS.items():
            family = CounterMetricFamily(name, text, labels=labels)
            for agent in self._agents:
                for label, value in getattr(agent, attr).items():
                    family.add_metric([agent.agent, label], value)
            yield family
        duration = HistogramMetricFamily(
            "choreo_handler_duration_seconds", "Handler run time per try.", labels=_BY_TYPE
        )
        confirm = HistogramMetricFamily(
            "choreo_publish_confirm_seconds",
            "From publishing a handler's emitted events to the broker's confirms.",
            labels=("agent",),
        )
        for agent in self._agents:
            for label, hist in agent.durations.items():
                duration.add_metric([agent.agent, label], hist.buckets(), hist.sum)
            confirm.add_metric([agent.agent], agent.confirm.buckets(), agent.confirm.sum)
        yield duration
        yield confirm


class AgentMetrics:
    """One agent's counters, per event type (types it does not handle count as ``other``)."""

    def __init__(self, metrics: Metrics, agent: str, handled_types: Iterable[str]) -> None:
        self.agent = agent
        self._types = {*handled_types, OTHER_TYPE}
        zero = dict.fromkeys(sorted(self._types), 0)
        self.received = dict(zero)
        self.handled = dict(zero)
        self.failed = dict(zero)
        self.retried = dict(zero)
        self.expired = dict(zero)
        self.duplicates = dict(zero)
        self.dead_lettered: dict[str, int] = {}
        self.durations = {t: _Histogram(_HANDLER_BUCKETS) for t in sorted(self._types)}
        self.confirm = _Histogram(_CONFIRM_BUCKETS)
        self._in_flight = metrics.in_flight.labels(agent)
        self._consumers = metrics.consumers.labels(agent)

    def bounded(self, event_type: str | None) -> str:
        """``event_type`` if this agent handles it, else ``other`` (labels stay bounded)."""
        return event_type if event_type in self._types else OTHER_TYPE

    def count_received(self, event_type: str) -> None:
        self.received[event_type] += 1

    def count_handled(self, event_type: str) -> None:
        self.handled[event_type] += 1

    def count_failed(self, event_type: str) -> None:
        self.failed[event_type] += 1

    def count_retried(self, event_type: str, count: int = 1) -> None:
        self.retried[event_type] += count

    def count_expired(self, event_type: str) -> None:
        self.expired[event_type] += 1

    def count_duplicate(self, event_type: str) -> None:
        self.duplicates[event_type] += 1

    def count_dead_lettered(self, reason: str) -> None:
        self.dead_lettered[reason] = self.dead_lettered.get(reason, 0) + 1

    def handler_seconds(self, event_type: str, seconds: float) -> None:
        self.durations[event_type].observe(seconds)

    def confirm_seconds(self, seconds: float) -> None:
        self.confirm.observe(seconds)

    def track_in_flight(self, read: Callable[[], float]) -> None:
        """Read at scrape time: the message path pays nothing for this gauge."""
        self._in_flight.set_function(read)

    def set_attached(self, attached: bool) -> None:
        self._consumers.set(1 if attached else 0)
