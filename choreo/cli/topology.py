"""``choreo topology show|apply AGENT_SPEC...``: what agents declare vs what the broker has."""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from ..agent import Agent
from ..config import Settings
from ..errors import TopologyError
from ..runtime import topology_for
from ..topology import QueueState
from ..transport.rabbitmq import RabbitMQTransport
from ._load import load_agent
from ._run import run

url_option = click.option("--url", envvar="CHOREO_AMQP_URL", help="Broker URL [env CHOREO_AMQP_URL].")


@click.group()
def topology() -> None:
    """Compare agents' declared topology with the broker, and apply it."""


def _diff_text(state: QueueState) -> str:
    return "; ".join(f"{arg}: declared {d}, existing {e}" for arg, (d, e) in sorted(state.drift.items()))


@topology.command()
@click.argument("agents", nargs=-1, required=True)
@url_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show(agents: tuple[str, ...], url: str | None, as_json: bool) -> None:
    """For each AGENT (module:agent), each queue it declares: present or missing, depth,
    consumers, bindings, and any argument that differs on the broker. Creates nothing.
    Exits 1 if anything is missing or drifted."""
    loaded = [load_agent(spec) for spec in agents]
    settings = Settings.from_env(amqp_url=url)

    async def work() -> list[tuple[Agent[Any], list[tuple[Any, QueueState]]]]:
        transport = RabbitMQTransport(settings.amqp_url, connection_name="choreo-topology")
        await transport.connect()
        try:
            out = []
            for agent in loaded:
                topo = topology_for(agent, settings)
                out.append((agent, [(spec, await transport.inspect_queue(spec)) for spec in topo.queues]))
            return out
        finally:
            await transport.close()

    report = run(work())
    problems = sum(1 for _, rows in report for _, st in rows if not st.exists or st.drift)
    if as_json:
        data = {
            agent.name: [
                {
                    "queue": spec.name,
                    "exists": st.exists,
                    "depth": st.depth,
                    "consumers": st.consumers,
                    "bindings": list(spec.bindings),
                    "arguments": dict(spec.arguments),
                    "drift": {k: {"declared": d, "existing": e} for k, (d, e) in st.drift.items()},
                }
                for spec, st in rows
            ]
            for agent, rows in report
        }
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        console = Console()
        for agent, rows in report:
            table = Table(title=f"{agent.name} on exchange {settings.naming.exchange}")
            for column in ("queue", "state", "depth", "consumers", "bindings (declared)", "differs"):
                table.add_column(column)
            for spec, st in rows:
                state = "missing" if not st.exists else ("DRIFT" if st.drift else "ok")
                table.add_row(
                    spec.name,
                    state,
                    str(st.depth) if st.exists else "-",
                    str(st.consumers) if st.exists else "-",
                    ", ".join(spec.bindings) or "-",
                    _diff_text(st) or "-",
                )
            console.print(table)
        # One plain line per problem: readable in logs and CI, where tables wrap.
        for _, rows in report:
            for spec, st in rows:
                if not st.exists:
                    click.echo(f"missing {spec.name}")
                elif st.drift:
                    click.echo(f"DRIFT {spec.name}: {_diff_text(st)}")
        if problems:
            console.print(
                f"{problems} queue(s) missing or different: `choreo topology apply` creates missing ones; "
                "a drifted queue must be drained, deleted and re-declared (or the agent aligned)."
            )
    sys.exit(1 if problems else 0)


@topology.command()
@click.argument("agents", nargs=-1, required=True)
@url_option
def apply(agents: tuple[str, ...], url: str | None) -> None:
    """Declare what each AGENT needs (idempotent). A queue that exists with other arguments is
    reported with the difference and left alone; exits 1 then."""
    loaded = [load_agent(spec) for spec in agents]
    settings = Settings.from_env(amqp_url=url)

    async def work() -> list[str]:
        transport = RabbitMQTransport(settings.amqp_url, connection_name="choreo-topology")
        await transport.connect()
        errors = []
        try:
            for agent in loaded:
                try:
                    await transport.declare(topology_for(agent, settings))
                    click.echo(f"{agent.name}: declared")
                except TopologyError as exc:
                    errors.append(f"{agent.name}: {exc}")
        finally:
            await transport.close()
        return errors

    errors = run(work())
    for error in errors:
        click.echo(error, err=True)
    sys.exit(1 if errors else 0)
