"""``choreo outbox relay --db URL``: publish a service's outbox table, in order, with confirms."""

from __future__ import annotations

import asyncio
import signal
import sys

import click

from ..config import Settings
from ..log import configure, get_logger
from ..outbox import Relay, open_outbox
from ..transport.rabbitmq import RabbitMQTransport
from ._run import run

log = get_logger("choreo.outbox")


@click.group()
def outbox() -> None:
    """Transactional outbox: relay events that services wrote in their own transactions."""


@outbox.command()
@click.option(
    "--db",
    "db_url",
    envvar="CHOREO_OUTBOX_DB",
    required=True,
    help="sqlite:///path or postgresql://... [env CHOREO_OUTBOX_DB]",
)
@click.option("--url", envvar="CHOREO_AMQP_URL", help="Broker URL [env CHOREO_AMQP_URL].")
@click.option("--batch", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--once", is_flag=True, help="Relay what is pending, then exit.")
def relay(db_url: str, url: str | None, batch: int, once: bool) -> None:
    """Publish unsent outbox rows in order, each confirmed before it is marked sent; ride out
    broker outages; stop on SIGTERM/SIGINT. Safe to restart at any point: a row re-published
    after a crash carries the same event id, which consumers deduplicate."""
    configure()
    settings = Settings.from_env(amqp_url=url)

    async def go() -> int:
        box = open_outbox(db_url)
        await box.open()
        transport = RabbitMQTransport(settings.amqp_url, connection_name="choreo-outbox-relay")
        await transport.connect()
        relay = Relay(box, transport, settings, batch=batch)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            log.info("outbox relay started", pending=await box.pending())
            if once:
                while await relay.relay_once():
                    pass
            else:
                await relay.run(stop)
        finally:
            log.info("outbox relay stopped", published=relay.published, pending=await box.pending())
            await transport.close()
            await box.close()
        return relay.published

    published = run(go())
    click.echo(f"published {published}", err=True)
    sys.exit(0)
