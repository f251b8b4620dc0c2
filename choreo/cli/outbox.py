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
    after a crash carries the same event id, which consumers deduplicate.

    sqlite:///shop.db is shop.db in the working directory, sqlite:////srv/shop.db an absolute
    path; the file and its outbox table must exist. A row that can never be published (not a
    valid envelope) is logged, left unsent and skipped; the relay then exits 1 naming it."""
    configure()
    settings = Settings.from_env(amqp_url=url)

    async def go() -> Relay:
        box = open_outbox(db_url)
        await box.open()
        try:
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
        finally:
            await box.close()
        return relay

    relay = run(go())
    click.echo(f"published {relay.published}", err=True)
    if relay.failed:
        for row in relay.failed.values():
            click.echo(
                f"error: outbox row seq={row.seq} id={row.id} cannot be published, left unsent: {row.error}", err=True
            )
        sys.exit(1)
    sys.exit(0)
