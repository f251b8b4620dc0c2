"""The ``choreo`` command."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import ChoreoError
from .agents import agents
from .demo import demo
from .dlq import dlq
from .outbox import outbox
from .publish import publish
from .topology import topology
from .worker import worker

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "CHOREO"})
@click.version_option(package_name="choreo")
def cli() -> None:
    """Event-driven choreography over RabbitMQ: signed events, idempotent agents, DLQs.

    Configuration comes from CHOREO_* environment variables; flags override them.
    """


@cli.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("schemas"), show_default=True)
@click.option("--check", is_flag=True, help="Exit 1 if the files differ from the models instead of writing them.")
def schemas(out: Path, check: bool) -> None:
    """Write (or --check) JSON Schemas for the envelope and the example events."""
    from agents.events import ALL_EVENTS

    from .. import schema

    if check:
        stale = schema.drift(out, ALL_EVENTS)
        if stale:
            raise click.ClickException(f"schemas out of date: {', '.join(stale)} (run `choreo schemas`)")
        click.echo(f"{out}: up to date")
        return
    for path in schema.write(out, ALL_EVENTS):
        click.echo(f"wrote {path}")


cli.add_command(worker)
cli.add_command(agents)
cli.add_command(publish)
cli.add_command(demo)
cli.add_command(dlq)
cli.add_command(outbox)
cli.add_command(topology)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except ChoreoError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2 if type(exc).__name__ == "ConfigError" else 1)
    except SystemExit:
        raise
