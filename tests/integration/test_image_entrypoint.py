"""What the container runs, run as a plain process: the Dockerfile's ENTRYPOINT with the compose
``payments`` service's command and environment (broker, store and tracing endpoints swapped for
local ones). If the image's command line or its environment stops making a ready worker, this
fails without needing a Docker engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import os
import shutil
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from choreo import Agent, Naming, Settings
from choreo.management import management_for
from choreo.runtime import topology_for
from choreo.testing import wait_for
from choreo.transport.rabbitmq import RabbitMQTransport

from ..conftest import free_port
from ..unit.test_deploy_files import compose, dockerfile_entrypoint, service_env

pytestmark = pytest.mark.rabbitmq


def _get(url: str) -> tuple[int, bytes] | None:
    """(status, body), or None while nothing listens yet."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def _executable(name: str) -> str:
    """The entrypoint as installed next to this interpreter (the venv), else on PATH."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert found is not None, f"{name!r} (the image's ENTRYPOINT) is not installed"
    return found


def _local_env(compose_env: dict[str, str], *, amqp_url: str, naming: Naming, state: Path, port: int) -> dict[str, str]:
    """The service's environment with everything that names a compose host made local."""
    env = dict(compose_env)
    # These must name compose services; otherwise the swap below would hide a wrong value.
    assert urlparse(env["CHOREO_AMQP_URL"]).hostname == "rabbitmq"
    assert urlparse(env["CHOREO_DEDUP_URL"]).hostname == "postgres"
    env["CHOREO_AMQP_URL"] = amqp_url
    env["CHOREO_DEDUP_URL"] = "sqlite:"
    env["CHOREO_STATE_DIR"] = str(state)
    env["CHOREO_EXCHANGE"] = naming.exchange
    env["CHOREO_QUEUE_PREFIX"] = naming.queue_prefix
    env["CHOREO_HTTP_PORT"] = str(port)
    env["OTEL_TRACES_EXPORTER"] = "none"
    for key in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        env.pop(key, None)
    # The developer's own CHOREO_*/OTEL_* settings must not leak in: only the service's count.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("CHOREO_", "OTEL_"))}
    return {**inherited, **env}


def _agent(spec: str) -> Agent[Any]:
    module, _, attribute = spec.partition(":")
    agent = getattr(importlib.import_module(module), attribute)
    assert isinstance(agent, Agent)
    return agent


async def test_image_entrypoint_runs_as_plain_process(
    rabbit_factory: Callable[[], Awaitable[RabbitMQTransport]], naming: Naming, amqp_url: str, tmp_path: Path
) -> None:
    service = compose()["services"]["payments"]
    command = [str(part) for part in service["command"]]
    port = free_port()
    env = _local_env(service_env(service), amqp_url=amqp_url, naming=naming, state=tmp_path / "state", port=port)
    entrypoint = dockerfile_entrypoint()
    argv = [_executable(entrypoint[0]), *entrypoint[1:], *command]

    # Declare what the worker will declare through a tracked connection, so the fixture deletes
    # the queues and the exchange afterwards (the broker here has few file handles to spare).
    admin = await rabbit_factory()
    assert command[0] == "worker"
    await admin.declare(topology_for(_agent(command[1]), Settings.from_env(env)))

    # Output to a file, not a pipe nobody reads while the worker runs (a full pipe blocks it).
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(*argv, env=env, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:

        async def ready() -> bool:
            if proc.returncode is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise AssertionError(f"{argv} exited with {proc.returncode} before it was ready:\n{tail}")
            answer = await asyncio.to_thread(_get, f"{base}/readyz")
            return answer is not None and answer[0] == 200

        await wait_for(ready, within=60, what="/readyz to answer 200")
        health = await asyncio.to_thread(_get, f"{base}/healthz")
        assert health is not None
        assert health[0] == 200
        metrics = await asyncio.to_thread(_get, f"{base}/metrics")
        assert metrics is not None
        assert metrics[0] == 200
        assert b"choreo_" in metrics[1]
        assert b'agent="payments"' in metrics[1]
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        await _delete_leftovers(admin, amqp_url, naming)
    assert proc.returncode == 0, log_path.read_text(errors="replace")[-3000:]


async def _delete_leftovers(admin: RabbitMQTransport, amqp_url: str, naming: Naming) -> None:
    """The heartbeat's control exchange, and any queue under the test's prefix that the worker
    declared beyond its topology (the tracked ones are deleted by the fixture)."""
    with contextlib.suppress(Exception):  # absent, or the broker refuses: nothing to clean
        await admin.delete_exchange(f"{naming.exchange}.control")
    management = management_for(amqp_url)
    if await management.available():
        for name in await management.queue_names():
            if name.startswith(naming.queue_prefix):
                await admin.delete_queue(name)
