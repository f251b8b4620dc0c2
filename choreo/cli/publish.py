"""``choreo publish TYPE JSON``: publish one signed event, for scripts and operators."""

from __future__ import annotations

import click

from .. import codec
from ..config import Settings
from ..errors import MalformedMessage
from ..publisher import Publisher, new_envelope
from ._run import run


@click.command()
@click.argument("event_type", metavar="TYPE")
@click.argument("payload", metavar="JSON")
@click.option("--url", envvar="CHOREO_AMQP_URL", help="Broker URL [env CHOREO_AMQP_URL].")
@click.option("--source", default="choreo-cli", show_default=True, help="The envelope's source.")
@click.option("--id", "event_id", help="Event id (default: a new UUIDv7).")
@click.option("--dedup-key", help="What consumers deduplicate on (default: the id).")
@click.option("--correlation-id", help="Conversation / saga id.")
@click.option("--ttl-ms", type=click.IntRange(min=1), help="Stale after this many milliseconds.")
def publish(
    event_type: str,
    payload: str,
    url: str | None,
    source: str,
    event_id: str | None,
    dedup_key: str | None,
    correlation_id: str | None,
    ttl_ms: int | None,
) -> None:
    """Publish one event of TYPE with the JSON object PAYLOAD; prints its id once confirmed.

    Example: choreo publish order.placed '{"order_id": "o-1", ...}'
    """
    try:
        data = codec.loads_object(payload.encode())
    except MalformedMessage as exc:
        raise click.BadParameter(str(exc), param_hint="JSON") from None
    settings = Settings.from_env(amqp_url=url)
    envelope = new_envelope(
        event_type,
        data,
        source=source,
        id=event_id,
        dedup_key=dedup_key,
        correlation_id=correlation_id,
        ttl_ms=ttl_ms,
    )

    async def send() -> None:
        async with Publisher(settings=settings, source=source) as publisher:
            await publisher.publish_envelope(envelope)

    run(send())
    click.echo(envelope.id)
