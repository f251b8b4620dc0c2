"""What an agent needs on the broker, as plain data (no broker code here).

Per agent ``A`` handling types ``T*`` on exchange ``E`` (names get an optional prefix so tests
and the demo can run beside a real deployment):

- ``E``: durable topic exchange, routing key = event type;
- ``A``: durable quorum queue bound to ``E`` with each handled type; an explicit
  ``x-delivery-limit``; over the limit the broker dead-letters to ``A.dlq`` at-least-once;
- ``A.dlq``: durable quorum queue holding messages that cannot be handled;
- ``A.retry.<tier>``: one durable quorum queue per delayed-retry tier with ``x-message-ttl``;
  expired messages dead-letter (at-least-once) through the default exchange back into ``A``
  only, never through the events exchange, so other agents never see a retry.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = [
    "DEFAULT_DELIVERY_LIMIT",
    "DEFAULT_EXCHANGE",
    "AgentQueues",
    "Naming",
    "QueueSpec",
    "QueueState",
    "Topology",
    "agent_topology",
]

DEFAULT_EXCHANGE = "choreo.events"
# Redeliveries the broker allows (crashes, nacks with requeue) before dead-lettering by itself.
# Handler retries do not count: they go through fresh publishes, not redeliveries.
DEFAULT_DELIVERY_LIMIT = 10
# A DLQ has no dead-letter target: at its delivery limit RabbitMQ would drop the message. It is
# read by operators (fetched, then returned), so its limit is explicit but out of reach.
DLQ_DELIVERY_LIMIT = 1_000_000

ArgValue = str | int | bool


@dataclass(frozen=True, slots=True)
class QueueSpec:
    name: str
    arguments: Mapping[str, ArgValue]
    bindings: tuple[str, ...] = ()  # routing keys bound on the events exchange


@dataclass(frozen=True, slots=True)
class QueueState:
    """What the broker has for a declared queue. ``drift`` maps each argument that differs
    from the declaration to ``(declared, existing)``."""

    name: str
    exists: bool
    depth: int = 0
    consumers: int = 0
    drift: Mapping[str, tuple[object, object]] = field(default_factory=dict)
    missing_bindings: tuple[str, ...] = ()
    extra_bindings: tuple[str, ...] = ()
    complete: bool = True  # False when the broker could only be probed over AMQP (see docs)


@dataclass(frozen=True, slots=True)
class Topology:
    exchange: str
    queues: tuple[QueueSpec, ...] = field(default=())

    def merge(self, other: Topology) -> Topology:
        if other.exchange != self.exchange:
            raise ValueError("cannot merge topologies on different exchanges")
        return Topology(self.exchange, self.queues + other.queues)


@dataclass(frozen=True, slots=True)
class Naming:
    """Where an installation's names live: the events exchange and an optional queue prefix."""

    exchange: str = DEFAULT_EXCHANGE
    queue_prefix: str = ""

    def agent_queues(self, agent: str) -> AgentQueues:
        base = f"{self.queue_prefix}{agent}"
        return AgentQueues(main=base, dlq=f"{base}.dlq")


@dataclass(frozen=True, slots=True)
class AgentQueues:
    main: str
    dlq: str

    def retry(self, tier_ms: int) -> str:
        return f"{self.main}.retry.{tier_label(tier_ms)}"


def tier_label(tier_ms: int) -> str:
    return f"{tier_ms // 1000}s" if tier_ms % 1000 == 0 else f"{tier_ms}ms"


def agent_topology(
    agent: str,
    handled_types: Iterable[str],
    *,
    naming: Naming | None = None,
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT,
    retry_tiers_ms: tuple[int, ...] = (),
) -> Topology:
    naming = naming or Naming()
    queues = naming.agent_queues(agent)
    main = QueueSpec(
        name=queues.main,
        arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": delivery_limit,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": queues.dlq,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        },
        bindings=tuple(sorted(set(handled_types))),
    )
    # Every quorum queue states its delivery limit: RabbitMQ 4 defaults to 20 and then drops.
    dlq = QueueSpec(name=queues.dlq, arguments={"x-queue-type": "quorum", "x-delivery-limit": DLQ_DELIVERY_LIMIT})
    tiers = tuple(
        QueueSpec(
            name=queues.retry(ms),
            arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": delivery_limit,
                "x-message-ttl": ms,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": queues.main,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            },
        )
        for ms in retry_tiers_ms
    )
    return Topology(naming.exchange, (main, dlq, *tiers))
