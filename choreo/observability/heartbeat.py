"""Heartbeats: every worker says, every few seconds, which agents it runs and how they fare.

They go to the control exchange ``<events exchange>.control`` (topic, routing key
``heartbeat.<agent>``), signed like events, not persistent, expiring after three intervals: a
heartbeat is only worth something while it is fresh. ``choreo agents`` binds a short-lived
queue to that exchange and lists what it hears within one interval.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..codec import dumps, loads_object
from ..envelope import now_timestamp
from ..errors import ChoreoError, MessageFault
from ..log import get_logger
from ..signing import Keyring
from ..topology import ArgValue, Naming, QueueSpec, Topology
from ..transport.base import Delivery, OutgoingMessage, Transport

__all__ = ["Heartbeat", "LatencyWindow", "collect", "control_exchange", "instance_id"]

log = get_logger("choreo.heartbeat")
ROUTING_PREFIX = "heartbeat."


def control_exchange(naming: Naming) -> str:
    return f"{naming.exchange}.control"


def instance_id() -> str:
    """host:pid, what an operator needs to find the process."""
    return f"{socket.gethostname()}:{os.getpid()}"


class LatencyWindow:
    """Handler run times of the last ``size`` messages, for the heartbeat's percentiles."""

    def __init__(self, size: int = 1024) -> None:
        self._values: deque[float] = deque(maxlen=size)

    def add(self, seconds: float) -> None:
        self._values.append(seconds)

    def percentiles_ms(self) -> dict[str, float | None]:
        if not self._values:
            return {"p50": None, "p99": None}
        ordered = sorted(self._values)

        def pick(q: float) -> float:
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

        return {"p50": pick(0.50), "p99": pick(0.99)}


Snapshot = Callable[[], Awaitable[list[dict[str, Any]]]]


class Heartbeat:
    """Publishes one heartbeat per agent every ``interval_s`` until cancelled."""

    def __init__(
        self,
        transport: Transport,
        naming: Naming,
        keyring: Keyring,
        snapshot: Snapshot,
        *,
        interval_s: float = 5.0,
        version: str = "",
    ) -> None:
        self.transport = transport
        self.exchange = control_exchange(naming)
        self.keyring = keyring
        self.snapshot = snapshot
        self.interval_s = interval_s
        self.version = version
        self.instance = instance_id()
        self.started_at = now_timestamp()

    async def declare(self) -> None:
        await self.transport.declare(Topology(self.exchange))

    async def beat(self) -> int:
        """Publish one heartbeat per agent now; returns how many went out."""
        sent = 0
        for fields in await self.snapshot():
            body = dumps(
                {
                    **fields,
                    "version": self.version,
                    "instance": self.instance,
                    "started_at": self.started_at,
                    "sent_at": now_timestamp(),
                    "interval_s": self.interval_s,
                }
            )
            await self.transport.publish(
                OutgoingMessage(
                    exchange=self.exchange,
                    routing_key=ROUTING_PREFIX + str(fields["agent"]),
                    body=body,
                    headers=dict(self.keyring.sign(body)),
                    type="choreo.heartbeat",
                    expiration_ms=int(self.interval_s * 3000),
                )
            )
            sent += 1
        return sent

    async def run(self) -> None:
        while True:
            try:
                await self.beat()
            except ChoreoError as exc:  # the broker is away; the next beat will say we are back
                log.debug("heartbeat not sent", error=repr(exc))
            await asyncio.sleep(self.interval_s)


@dataclass(frozen=True, slots=True)
class Seen:
    heartbeat: dict[str, Any]
    received_at: float  # time.time()
    verified: bool


async def collect(
    transport: Transport, naming: Naming, keyring: Keyring, *, wait_s: float, agents: Sequence[str] = ()
) -> list[Seen]:
    """Listen on the control exchange for ``wait_s`` seconds; the latest heartbeat of each
    (agent, instance). Unsigned or badly signed heartbeats are kept but marked unverified."""
    exchange = control_exchange(naming)
    name = f"{naming.queue_prefix}choreo.agents.{uuid.uuid4().hex[:12]}"
    bindings = tuple(ROUTING_PREFIX + a for a in agents) or (ROUTING_PREFIX + "#",)
    # Classic and self-expiring: a listener killed mid-way leaves nothing behind for long.
    args: dict[str, ArgValue] = {"x-queue-type": "classic", "x-expires": int(wait_s * 1000) + 30_000}
    await transport.declare(Topology(exchange, (QueueSpec(name, args, bindings),)))
    latest: dict[tuple[str, str], Seen] = {}

    async def on_message(delivery: Delivery) -> None:
        try:
            try:
                keyring.verify(delivery.body, delivery.headers)
                verified = True
            except MessageFault:
                verified = False
            beat = loads_object(delivery.body)
            key = (str(beat.get("agent")), str(beat.get("instance")))
            latest[key] = Seen(beat, time.time(), verified)
        except MessageFault:
            pass  # not a heartbeat; this listener only reads
        finally:
            await delivery.ack()

    sub = await transport.subscribe(name, on_message, prefetch=100)
    try:
        await asyncio.sleep(wait_s)  # listening for a fixed window is the point here
    finally:
        await sub.cancel()
        await transport.delete_queue(name)
    return sorted(latest.values(), key=lambda s: (str(s.heartbeat.get("agent")), str(s.heartbeat.get("instance"))))
