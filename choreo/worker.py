"""A worker process: runs agents on one connection until told to stop.

Shutdown (SIGTERM/SIGINT, or the ``stop`` event): every agent stops consuming, in-flight
handlers finish within the grace period and settle their messages, then the connection closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Sequence
from typing import Any

from .agent import Agent
from .config import Settings
from .errors import ConfigError, TopologyError
from .log import get_logger
from .runtime import AgentRuntime
from .transport.base import Transport

__all__ = ["Worker"]

log = get_logger("choreo.worker")


class Worker:
    def __init__(
        self,
        agents: Sequence[Agent[Any]],
        *,
        settings: Settings | None = None,
        transport: Transport | None = None,
    ) -> None:
        names = [a.name for a in agents]
        if len(set(names)) != len(names):
            raise ValueError(f"agent names must be unique in one worker: {names}")
        self.settings = settings or Settings.from_env()
        self._owns_transport = transport is None
        if transport is None:
            from .transport.rabbitmq import RabbitMQTransport

            transport = RabbitMQTransport(self.settings.amqp_url, connection_name=f"choreo-worker:{','.join(names)}")
        self.transport = transport
        self.runtimes = [AgentRuntime(agent, transport, self.settings) for agent in agents]
        self.started = asyncio.Event()
        self.topology_retry_s = 30.0

    async def is_ready(self) -> bool:
        """Connected and every agent's consumer attached (readiness, not just liveness)."""
        if not self.transport.connected:
            return False
        return all([await r.is_attached() for r in self.runtimes])

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
            for sig in installed:
                loop.remove_signal_handler(sig)
