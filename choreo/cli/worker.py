"""``choreo worker MODULE:AGENT [...]``: run agents until SIGTERM/SIGINT."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..config import Settings
from ..errors import ConfigError
from ..log import configure
from ..observability import tracing
from ..worker import Worker
from ._load import load_agent
from ._run import run


@click.command()
@click.argument("agents", nargs=-1, required=True)
@click.option("--url", envvar="CHOREO_AMQP_URL", help="Broker URL [env CHOREO_AMQP_URL].")
@click.option("--prefetch", type=click.IntRange(min=1), help="Unacked deliveries per agent [env CHOREO_PREFETCH].")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), help="[env CHOREO_STATE_DIR]")
@click.option(
    "--http-port",
    type=click.IntRange(min=0, max=65535),
    help="Serve /metrics, /healthz and /readyz on this port [env CHOREO_HTTP_PORT; default: off].",
)
@click.option("--json-logs/--console-logs", default=None, help="Log format (default: JSON unless on a terminal).")
def worker(
    agents: tuple[str, ...],
    url: str | None,
    prefetch: int | None,
    state_dir: Path | None,
    http_port: int | None,
    json_logs: bool | None,
) -> None:
    """Run AGENTS (e.g. agents.inventory:agent) until SIGTERM or SIGINT.

    On a signal the worker stops consuming, lets in-flight handlers finish (up to
    CHOREO_SHUTDOWN_GRACE_S), settles their messages and exits 0. Traces are exported when the
    standard OTEL_* variables ask for it (e.g. OTEL_TRACES_EXPORTER=otlp).
    """
    configure(json=json_logs)
    loaded = [load_agent(spec) for spec in agents]
    names = [a.name for a in loaded]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:  # each agent owns its queue: two copies in one worker would share it
        raise ConfigError(f"agent names must be unique in one worker: {', '.join(repeated)} given more than once")
    settings = Settings.from_env(amqp_url=url, prefetch=prefetch, state_dir=state_dir, http_port=http_port)
    tracing.configure_from_env(service_name=",".join(names))
    try:
        clean = run(Worker(loaded, settings=settings).run())
    except OSError as exc:
        if exc.filename is None:
            raise  # a network failure: reported by choreo.cli.main as a runtime error
        # A path the worker cannot use: the state directory (or a store file inside it).
        raise ConfigError(
            f"{exc.filename}: {exc.strerror or exc} (state directory: {settings.state_dir};"
            " set CHOREO_STATE_DIR or --state-dir)"
        ) from exc
    sys.exit(0 if clean else 3)
