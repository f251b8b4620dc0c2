"""A worker process: runs agents on one connection until told to stop.

Shutdown (SIGTERM/SIGINT, or the ``stop`` event): every agent stops consuming, in-flight
handlers finish within the grace period and settle their messages, then the connection closes.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Sequence
from typing import Any

from .agent import Agent
from .config import Settings
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

    async def is_ready(self) -> bool:
        """Connected and every agent's consumer attached (readiness, not just liveness)."""
        if not self.transport.connected:
            return False
        return all([await r.is_attached() for r in self.runtimes])

    async def start(self) -> None:
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
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    loop.add_signal_handler(sig, stop.set)
                    installed.append(sig)
                except (NotImplementedError, RuntimeError):  # not the main thread / platform
                    pass
        try:
            await self.start()
            log.info("worker ready", agents=[r.agent.name for r in self.runtimes])
            await stop.wait()
            log.info("worker stopping")
            return await self.stop()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
