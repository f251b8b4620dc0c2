"""A worker process: runs agents on one connection until told to stop.

Shutdown (SIGTERM/SIGINT, or the ``stop`` event): every agent stops consuming, in-flight
handlers finish within the grace period and settle their messages, then the connection closes.

While it runs it shows itself: ``/metrics``, ``/healthz`` and ``/readyz`` on
``CHOREO_HTTP_PORT`` (when set), a heartbeat per agent every ``CHOREO_HEARTBEAT_S`` on the
control exchange, and spans when the ``OTEL_*`` variables turn tracing on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import signal
from collections.abc import Sequence
from typing import Any

from ._version import __version__
from .agent import Agent
from .config import Settings
from .errors import ConfigError, TopologyError
from .log import get_logger
from .observability.heartbeat import Heartbeat
from .observability.http import HealthServer
from .observability.metrics import CONTENT_TYPE, Metrics
from .runtime import AgentRuntime
from .transport.base import Transport

__all__ = ["Worker"]

log = get_logger("choreo.worker")

# Young-generation collections run every 700 net allocations of container objects by default;
# a worker allocates several per message (futures, coroutines, dicts), so that is thousands
# of collections a second, each also walking whatever messages are in flight. Cycles are rare
# on the hot path (objects die by reference count), so collecting less often costs little memory.
GC_THRESHOLD = (20_000, 20, 20)


@functools.cache
def tune_gc() -> None:
    """Freeze what start-up allocated (modules, classes, schemas) out of the collector's sight
    and make young collections rarer. Process-wide and once per process, so a second worker in
    it freezes nothing of the first one's. Objects frozen here are never collected even if they
    become cyclic garbage later: an application that embeds a Worker and keeps replacing
    long-lived objects may prefer ``CHOREO_GC_TUNING=0``."""
    gc.collect()
    gc.freeze()  # start-up objects live for the whole process: never walk them again
    gc.set_threshold(*GC_THRESHOLD)


class Worker:
    def __init__(
        self,
        agents: Sequence[Agent[Any]],
        *,
        settings: Settings | None = None,
        transport: Transport | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        names = [a.name for a in agents]
        if len(set(names)) != len(names):
            raise ValueError(f"agent names must be unique in one worker: {names}")
        self.settings = settings or Settings.from_env()
        self._owns_transport = transport is None
        if transport is None:
            from .transport.rabbitmq import RabbitMQTransport

            transport = RabbitMQTransport(
                self.settings.amqp_url,
                connection_name=f"choreo-worker:{','.join(names)}",
                ack_window_s=self.settings.settle_window_ms / 1000,
            )
        self.transport = transport
        self.metrics = metrics or Metrics()
        self.runtimes = [AgentRuntime(agent, transport, self.settings, metrics=self.metrics) for agent in agents]
        self.started = asyncio.Event()
        self.topology_retry_s = 30.0
        port = self.settings.http_port
        self.http = (
            HealthServer(port=port, readiness=self.readiness, metrics=self._exposition) if port is not None else None
        )
        self.heartbeat = (
            Heartbeat(
                transport,
                self.settings.naming,
                self.settings.keyring,
                self._heartbeat_fields,
                interval_s=self.settings.heartbeat_s,
                version=__version__,
            )
            if self.settings.heartbeat_s > 0
            else None
        )
        self._heartbeat_task: asyncio.Task[None] | None = None

    async def is_ready(self) -> bool:
        """Connected and every agent's consumer attached (readiness, not just liveness)."""
        ready, _ = await self.readiness()
        return ready

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Readiness and why: connected, started, and each agent's consumer attached."""
        connected = self.transport.connected
        attached = {r.agent.name: connected and await r.is_attached() for r in self.runtimes}
        for runtime in self.runtimes:
            runtime.metrics.set_attached(attached[runtime.agent.name])
        ready = connected and self.started.is_set() and all(attached.values())
        self.metrics.ready.set(1 if ready else 0)
        return ready, {"connected": connected, "started": self.started.is_set(), "consumers_attached": attached}

    async def _exposition(self) -> tuple[bytes, str]:
        await self.readiness()  # gauges that need the broker's view are read at scrape time
        return self.metrics.exposition(), CONTENT_TYPE

    async def _heartbeat_fields(self) -> list[dict[str, Any]]:
        ready, details = await self.readiness()
        return [
            {
                "agent": r.agent.name,
                "types": list(r.agent.handled_types),
                "ready": ready,
                "attached": details["consumers_attached"][r.agent.name],
                "handled": r.stats.handled,
                "duplicates": r.stats.duplicates,
                "failed": r.stats.failed,
                "dead_lettered": r.stats.dead_lettered_total,
                "in_flight": r.in_flight,
                "latency_ms": r.latency.percentiles_ms(),
            }
            for r in self.runtimes
        ]

    async def start_http(self) -> None:
        """Serve /metrics, /healthz and /readyz (if a port is configured); idempotent."""
        if self.http is not None and not self.http.running:
            await self.http.start()

    async def close_http(self) -> None:
        if self.http is not None:
            await self.http.close()

    async def start(self) -> None:
        self._check_keys()
        if self._owns_transport:
            await self.transport.connect()
        started: list[AgentRuntime[Any]] = []
        try:
            for runtime in self.runtimes:
                await runtime.start()
                started.append(runtime)
        except BaseException:
            for runtime in started:
                await runtime.stop(grace_s=0)
            if self._owns_transport:
                await self.transport.close()
            raise
        if self.settings.gc_tuning:
            tune_gc()
        if self.heartbeat is not None:
            await self.heartbeat.declare()
            self._heartbeat_task = asyncio.get_running_loop().create_task(self.heartbeat.run())
        self.started.set()

    def _check_keys(self) -> None:
        """Refuse to start a worker that would dead-letter every message for want of keys."""
        keyring = self.settings.keyring
        if not keyring.kids and not keyring.accept_unsigned:
            raise ConfigError(
                "no verification keys: set CHOREO_SIGNING_KEYS (e.g. k1=secret) or CHOREO_ED25519_VERIFY_KEYS; "
                "without them every message would be dead-lettered as 'signature'"
            )
        if keyring.signer is None:
            raise ConfigError(
                "no signing key: handlers' emitted events and failure events must be signed; set CHOREO_SIGNING_KEYS "
                "or CHOREO_ED25519_SIGNING_KEY"
            )

    async def stop(self) -> bool:
        self.started.clear()  # not ready from here on: let load balancers look elsewhere
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat_task
            self._heartbeat_task = None
        results = await asyncio.gather(*(r.stop() for r in self.runtimes))
        if self._owns_transport:
            await self.transport.close()
        return all(results)

    async def run(self, stop: asyncio.Event | None = None, *, handle_signals: bool = True) -> bool:
        """Run until ``stop`` is set or SIGTERM/SIGINT arrives; returns True on a clean drain."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []

        def on_signal() -> None:
            if stop.is_set():  # a second signal: the operator does not want to wait
                log.warning("second signal: exiting now; unacked messages will be redelivered")
                os._exit(130)
            stop.set()

        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    loop.add_signal_handler(sig, on_signal)
                    installed.append(sig)
                except (NotImplementedError, RuntimeError):  # not the main thread / platform
                    pass
        try:
            await self.start_http()  # /healthz answers, and /readyz says 503, while connecting
            while True:
                try:
                    await self.start()
                    break
                except TopologyError as exc:
                    # Exiting would become a crash loop under a restart policy: stay up, not
                    # ready, say what differs, and look again until an operator fixes it.
                    log.error(
                        "topology differs from the broker; not consuming until it is fixed",
                        error=str(exc),
                        differences={k: {"declared": d, "existing": e} for k, (d, e) in exc.differences.items()},
                        retry_in_s=self.topology_retry_s,
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self.topology_retry_s)
                    if stop.is_set():
                        return True
            log.info("worker ready", agents=[r.agent.name for r in self.runtimes])
            await stop.wait()
            log.info("worker stopping")
            return await self.stop()
        finally:
            await self.close_http()
            for sig in installed:
                loop.remove_signal_handler(sig)
