"""``choreo agents``: the agents alive right now, from their heartbeats."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from ..config import Settings
from ..observability.heartbeat import Seen, collect
from ..transport.rabbitmq import RabbitMQTransport
from ._run import run


@click.command()
@click.option("--url", envvar="CHOREO_AMQP_URL", help="Broker URL [env CHOREO_AMQP_URL].")
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(min=0.1),
    help="Seconds to listen [default: one heartbeat interval (CHOREO_HEARTBEAT_S) plus 1].",
)
@click.option("--agent", "names", multiple=True, help="Only these agents (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per heartbeat heard.")
def agents(url: str | None, wait_s: float | None, names: tuple[str, ...], as_json: bool) -> None:
    """List live agents: instance, version, readiness, counts and handler latency.

    Listens on the control exchange; every worker sends a heartbeat per agent every
    CHOREO_HEARTBEAT_S seconds. Exits 1 if none was heard.
    """
    settings = Settings.from_env(amqp_url=url)
    listen = wait_s if wait_s is not None else (settings.heartbeat_s or 5.0) + 1.0
    if not as_json:
        click.echo(f"listening for heartbeats on {settings.naming.exchange}.control for {listen:.1f}s...", err=True)
    seen = run(_collect(settings, listen, names))
    if as_json:
        for s in seen:
            click.echo(
                json.dumps({**s.heartbeat, "verified": s.verified, "age_s": round(time.time() - s.received_at, 3)})
            )
    else:
        _table(seen)
    if not seen:
        click.echo("no agent heard from", err=True)
        sys.exit(1)


async def _collect(settings: Settings, wait_s: float, names: tuple[str, ...]) -> list[Seen]:
    transport = RabbitMQTransport(settings.amqp_url, connection_name="choreo-agents")
    await transport.connect()
    try:
        return await collect(transport, settings.naming, settings.keyring, wait_s=wait_s, agents=names)
    finally:
        await transport.close()


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}"


def _table(seen: list[Seen]) -> None:
    table = Table("agent", "instance", "version", "ready", "handled", "dup", "failed", "dlq", "in flight", "p50 ms",
                  "p99 ms", "types", "signed")  # fmt: skip
    for s in seen:
        b = s.heartbeat
        latency = b.get("latency_ms") or {}
        table.add_row(
            str(b.get("agent")),
            str(b.get("instance")),
            str(b.get("version")),
            "yes" if b.get("ready") else "NO",
            str(b.get("handled")),
            str(b.get("duplicates")),
            str(b.get("failed")),
            str(b.get("dead_lettered")),
            str(b.get("in_flight")),
            _ms(latency.get("p50")),
            _ms(latency.get("p99")),
            ", ".join(b.get("types") or []),
            "yes" if s.verified else "NO",
        )
    Console().print(table)
