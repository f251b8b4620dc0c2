"""Worker processes for chaos tests: ``choreo worker`` as a child, in the test's namespace."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from choreo import Settings
from choreo.observability.heartbeat import control_exchange
from choreo.runtime import topology_for
from choreo.testing import wait_for
from choreo.topology import Topology
from choreo.transport.rabbitmq import RabbitMQTransport

from ..conftest import SECRET


class WorkerProcess:
    """``choreo worker SPEC`` as a child process, logging to a file."""

    def __init__(self, spec: str, env: dict[str, str], log: Path) -> None:
        self.spec = spec
        self.env = env
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        offset = self.log.stat().st_size if self.log.exists() else 0
        handle = self.log.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "choreo", "worker", self.spec, env=self.env, stdout=handle, stderr=handle
        )
        handle.close()

        def ready() -> bool:
            with self.log.open("rb") as f:
                f.seek(offset)
                return b"worker ready" in f.read()

        await wait_for(ready, within=30, what=f"{self.spec} to be ready")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), 60)

    async def stop(self) -> int:
        if self.proc is None or self.proc.returncode is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return await self.wait()


@pytest.fixture
async def workers(
    settings: Settings,
    amqp_url: str,
    tmp_path: Path,
    rabbit_factory: Callable[[], Awaitable[RabbitMQTransport]],
    worker_env: dict[str, str],
) -> AsyncIterator[Callable[[str], Awaitable[WorkerProcess]]]:
    """Starts worker processes in the test's namespace; declares their queues first through a
    tracked connection so the test deletes them afterwards."""
    admin = await rabbit_factory()
    env = {
        **os.environ,
        "CHOREO_AMQP_URL": amqp_url,
        "CHOREO_SIGNING_KEYS": f"k1={SECRET}",
        "CHOREO_EXCHANGE": settings.naming.exchange,
        "CHOREO_QUEUE_PREFIX": settings.naming.queue_prefix,
        "CHOREO_STATE_DIR": str(settings.state_dir),
        "CHOREO_DEDUP_LEASE_S": "3",  # a killed worker's claims free up quickly
        "CHOREO_SHUTDOWN_GRACE_S": "20",
        **worker_env,
    }
    started: list[WorkerProcess] = []
    # Declared here, through the tracked connection, so the workers' heartbeat exchange is
    # deleted with the rest of the test's namespace.
    await admin.declare(Topology(control_exchange(settings.naming)))

    async def start(spec: str) -> WorkerProcess:
        from choreo.cli._load import load_agent

        await admin.declare(topology_for(load_agent(spec), settings))
        name = spec.partition(":")[0].rsplit(".", 1)[-1]
        worker = WorkerProcess(spec, env, tmp_path / f"{name}-{len(started)}.log")
        await worker.start()
        started.append(worker)
        return worker

    yield start
    codes = [await w.stop() for w in started]
    assert all(code in (0, -signal.SIGKILL) for code in codes), codes


def need_rabbitmqctl() -> str:
    path = shutil.which("rabbitmqctl")
    if path is None:
        pytest.skip("rabbitmqctl not available to close connections from the broker side")
    return path


async def close_all_connections(why: str) -> None:
    """Have the broker close every client connection, as a broker restart or failover would."""
    proc = await asyncio.create_subprocess_exec(
        need_rabbitmqctl(), "close_all_connections", why, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, (out + err).decode()


@pytest.fixture
def worker_env() -> dict[str, str]:
    """Extra environment for the worker processes; override in a test module."""
    return {}
