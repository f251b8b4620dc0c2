"""``choreo demo``: the order saga end to end, with a progress bar and a summary."""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..agent import Agent
from ..config import Settings
from ..errors import TransportError
from ..log import configure
from ..observability.heartbeat import control_exchange
from ..runtime import topology_for
from ..signing import Keyring
from ..topology import Naming
from ..transport.base import Transport
from ..transport.memory import InMemoryTransport
from ._run import run


@click.command()
@click.option("-n", "--orders", type=click.IntRange(min=4), default=200, show_default=True, help="Orders to place.")
@click.option("--url", envvar="CHOREO_AMQP_URL", help="Broker URL [env CHOREO_AMQP_URL].")
@click.option("--memory", is_flag=True, help="Use the in-memory broker even if RabbitMQ is reachable.")
@click.option("--keep", is_flag=True, help="Leave the demo's queues on the broker for inspection.")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds to wait for all orders.")
def demo(orders: int, url: str | None, memory: bool, keep: bool, timeout: float) -> None:
    """Run the four saga agents, place ORDERS orders mixing all outcomes, and check that every
    order ended exactly once with the compensations its failure calls for. Exits 1 otherwise."""
    configure(json=True, level=40)  # the progress bar is the output; agents log only errors
    console = Console(stderr=False)
    ok = run(_demo(console, orders, url=url, memory=memory, keep=keep, wait_s=timeout))
    sys.exit(0 if ok else 1)


async def _connect(console: Console, settings: Settings, memory: bool) -> tuple[Transport, str]:
    if not memory:
        from ..transport.rabbitmq import RabbitMQTransport

        rabbit = RabbitMQTransport(settings.amqp_url, connection_name="choreo-demo", timeout=5.0)
        try:
            await rabbit.connect()
            return rabbit, f"RabbitMQ at {rabbit.connected_url or settings.amqp_url.split('@')[-1]}"
        except TransportError as exc:
            console.print(f"[yellow]No RabbitMQ reachable ({exc}).[/]")
            console.print("[yellow]Running on the in-memory broker instead (same semantics, one process).[/]")
    transport = InMemoryTransport()
    await transport.connect()
    return transport, "the in-memory broker"


async def _demo(console: Console, n: int, *, url: str | None, memory: bool, keep: bool, wait_s: float) -> bool:
    from agents.saga import SAGA_AGENTS, AuditLog, auditor_agent, plan_orders, run_saga

    run_id = secrets.token_hex(3)
    settings = Settings.from_env(amqp_url=url)
    if settings.keyring.signer is None:
        settings = replace(settings, keyring=Keyring.hmac((f"demo-{run_id}", secrets.token_hex(16))))
    with tempfile.TemporaryDirectory(prefix="choreo-demo-") as state:
        # A namespace of its own, so the demo never touches a deployment's queues.
        settings = replace(
            settings,
            naming=Naming(exchange=f"demo-{run_id}.events", queue_prefix=f"demo-{run_id}."),
            state_dir=Path(state),
        )
        transport, where = await _connect(console, settings, memory)
        console.print(f"choreo demo: {n} orders through inventory → payments → shipping → orders on {where}")
        plans = plan_orders(n, run_id=f"{run_id}-")
        try:
            with Progress(
                TextColumn("orders ended"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=False,
                disable=not console.is_terminal and os.environ.get("CHOREO_PROGRESS") != "1",
            ) as progress:
                task = progress.add_task("orders", total=n)
                report = await run_saga(
                    transport,
                    settings,
                    plans,
                    timeout_s=wait_s,
                    on_progress=lambda ended: progress.update(task, completed=ended),
                )
        finally:
            if not keep:
                await _cleanup(transport, settings, [*SAGA_AGENTS, auditor_agent(AuditLog())])
            await transport.close()

    table = Table(title="choreo demo: summary", show_header=False)
    table.add_row("orders", str(report.orders))
    table.add_row("completed", str(report.completed))
    for reason in ("out_of_stock", "payment_declined", "shipping_failed"):
        table.add_row(f"cancelled: {reason}", str(report.cancelled.get(reason, 0)))
    table.add_row(
        "compensations", f"{report.releases + report.refunds} ({report.releases} releases, {report.refunds} refunds)"
    )
    table.add_row(
        "duplicates suppressed",
        f"{report.duplicates_suppressed} ({report.duplicates_published} re-published on purpose)",
    )
    dead = ", ".join(f"{k} {v}" for k, v in sorted(report.dead_lettered.items())) or "none"
    table.add_row("dead-lettered", f"{report.dead_lettered_total} ({dead}; injected on purpose)")
    table.add_row("saga latency p50 / p99", f"{report.percentile(50):.0f} ms / {report.percentile(99):.0f} ms")
    table.add_row("elapsed", f"{report.elapsed_s:.2f} s ({report.orders / max(report.elapsed_s, 1e-9):.0f} orders/s)")
    console.print(table)
    if report.ok:
        console.print("[green]Every order ended exactly once, with every compensation its failure called for.[/]")
        return True
    console.print(f"[red]{len(report.problems)} problem(s):[/]")
    for problem in report.problems[:20]:
        console.print(f"  - {problem}")
    return False


async def _cleanup(transport: Transport, settings: Settings, agents: list[Agent[Any]]) -> None:
    """Best effort: a broker gone mid-demo must not hide the summary."""
    for agent in agents:
        for queue in topology_for(agent, settings).queues:
            with contextlib.suppress(TransportError, TimeoutError, OSError):
                await transport.delete_queue(queue.name)
    for exchange in (settings.naming.exchange, control_exchange(settings.naming)):
        with contextlib.suppress(TransportError, TimeoutError, OSError):
            await transport.delete_exchange(exchange)
