"""``choreo topology show|apply AGENT_SPEC...``: what agents declare vs what the broker has."""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from ..agent import Agent
from ..config import Settings
from ..errors import TopologyError
from ..management import Management, management_for
from ..runtime import topology_for
from ..topology import QueueSpec, QueueState
from ..transport.rabbitmq import RabbitMQTransport
from ._load import load_agent
from ._run import run

url_option = click.option("--url", envvar="CHOREO_AMQP_URL", help="Broker URL [env CHOREO_AMQP_URL].")


@click.group()
def topology() -> None:
    """Compare agents' declared topology with the broker, and apply it."""


def _diff_text(state: QueueState) -> str:
    parts = [f"{arg}: declared {d}, existing {e}" for arg, (d, e) in sorted(state.drift.items())]
    parts += [f"binding {key}: declared, missing" for key in state.missing_bindings]
    parts += [f"binding {key}: not declared, exists" for key in state.extra_bindings]
    return "; ".join(parts)


def _differs(state: QueueState) -> bool:
    return bool(state.drift or state.missing_bindings or state.extra_bindings)


async def _inspect(transport: RabbitMQTransport, api: Management | None, exchange: str, spec: QueueSpec) -> QueueState:
    """Every argument and binding through the management API when it answers; otherwise what
    AMQP can tell (presence, depth, consumers, first differing argument; bindings unchecked)."""
    if api is None:
        state = await transport.inspect_queue(spec)
        return dataclasses.replace(state, complete=False)
    record = await api.queue(spec.name)
    if record is None:
        return QueueState(spec.name, exists=False)
    existing = record.get("arguments") or {}
    drift = {
        key: (spec.arguments.get(key), existing.get(key))
        for key in set(spec.arguments) | set(existing)
        if spec.arguments.get(key) != existing.get(key)
    }
    bound = await api.bindings(spec.name, exchange)
    return QueueState(
        spec.name,
        True,
        int(record.get("messages_ready") or 0),
        int(record.get("consumers") or 0),
        drift,
        missing_bindings=tuple(sorted(set(spec.bindings) - bound)),
        extra_bindings=tuple(sorted(bound - set(spec.bindings))),
    )


@topology.command()
@click.argument("agents", nargs=-1, required=True)
@url_option
@click.option(
    "--management-url", envvar="CHOREO_MANAGEMENT_URL", help="Management API [default: the broker host, port 15672]."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show(agents: tuple[str, ...], url: str | None, management_url: str | None, as_json: bool) -> None:
    """For each AGENT (module:agent), each queue it declares: present or missing, depth,
    consumers, bindings, and any argument that differs on the broker. Creates nothing.
    Exits 1 if anything is missing or drifted."""
    loaded = [load_agent(spec) for spec in agents]
    settings = Settings.from_env(amqp_url=url)

    async def work() -> list[tuple[Agent[Any], list[tuple[Any, QueueState]]]]:
        transport = RabbitMQTransport(settings.amqp_url, connection_name="choreo-topology")
        await transport.connect()
        api: Management | None = management_for(settings.amqp_url, management_url)
        if api is not None and not await api.available():
            api = None
        try:
            out = []
            for agent in loaded:
                topo = topology_for(agent, settings)
                rows = [(spec, await _inspect(transport, api, topo.exchange, spec)) for spec in topo.queues]
                out.append((agent, rows))
            return out
        finally:
            await transport.close()

    report = run(work())
    problems = sum(1 for _, rows in report for _, st in rows if not st.exists or _differs(st))
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
                    "missing_bindings": list(st.missing_bindings),
                    "extra_bindings": list(st.extra_bindings),
                    "complete": st.complete,
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
                state = "missing" if not st.exists else ("DRIFT" if _differs(st) else "ok")
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
                elif _differs(st):
                    click.echo(f"DRIFT {spec.name}: {_diff_text(st)}")
        if any(not st.complete for _, rows in report for _, st in rows):
            click.echo(
                "note: the management API did not answer, so bindings were not compared and only the first "
                "differing argument of a queue is known (enable rabbitmq_management, or pass --management-url)"
            )
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
