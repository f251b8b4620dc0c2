"""The ``choreo`` command."""

from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path

import click

from ..errors import ChoreoError

__all__ = ["cli", "main"]

# Subcommands load when invoked: a worker process then never imports the CLI's table and
# progress-bar code (rich), which is several MB of resident memory per worker.
_COMMANDS = {
    "worker": "worker",
    "agents": "agents",
    "publish": "publish",
    "demo": "demo",
    "dlq": "dlq",
    "outbox": "outbox",
    "topology": "topology",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = _COMMANDS.get(cmd_name)
        if module is None:
            return super().get_command(ctx, cmd_name)
        command = getattr(importlib.import_module(f"{__package__}.{module}"), cmd_name)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "CHOREO"})
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
    except Exception as exc:
        if not isinstance(exc, _runtime_errors()):
            raise  # a bug: its traceback is what a report needs
        click.echo(f"error: {_describe(exc)}", err=True)
        sys.exit(1)


def _runtime_errors() -> tuple[type[BaseException], ...]:
    """What the world outside (network, files, the databases choreo talks to) can raise: a
    runtime failure to report in one line, not a bug. Looked up only when something failed."""
    errors: list[type[BaseException]] = [OSError]
    for store in ("redis", "postgres"):  # each names its own library's errors
        with contextlib.suppress(ImportError):
            errors += importlib.import_module(f"choreo.stores.{store}").BACKEND_ERRORS
    return tuple(errors)


def _describe(exc: BaseException) -> str:
    module = type(exc).__module__.partition(".")[0]
    origin = "" if module == "builtins" else f"{module}: "  # redis:, asyncpg:
    return f"{origin}{exc}"
