"""``choreo publish TYPE JSON``: publish one signed event, for scripts and operators."""

from __future__ import annotations

import click
import pydantic

from .. import codec
from ..config import Settings
from ..errors import MalformedMessage, PublishNotConfirmed, TransportError
from ..observability import tracing
from ..publisher import new_envelope, publish_traced, to_message
from ..transport.rabbitmq import RabbitMQTransport
from ._run import run

# 100 years: past that an expiry time no longer fits a datetime on the consumers' side, and
# the JSON integer would not fit 64 bits either.
MAX_TTL_MS = 100 * 365 * 24 * 3600 * 1000
# Which argument or option set each envelope field, to name it in an error.
_PARAMS = {
    "type": "TYPE",
    "payload": "JSON",
    "source": "--source",
    "id": "--id",
    "dedup_key": "--dedup-key",
    "correlation_id": "--correlation-id",
    "ttl_ms": "--ttl-ms",
}


class Unroutable(TransportError):  # noqa: N818 - named after the broker's own term
    """No queue is bound to the event's type: the broker returned the message."""


@click.command()
@click.argument("event_type", metavar="TYPE")
@click.argument("payload", metavar="JSON")
@click.option("--url", envvar="CHOREO_AMQP_URL", help="Broker URL [env CHOREO_AMQP_URL].")
@click.option("--source", default="choreo-cli", show_default=True, help="The envelope's source.")
@click.option("--id", "event_id", help="Event id (default: a new UUIDv7).")
@click.option("--dedup-key", help="What consumers deduplicate on (default: the id).")
@click.option("--correlation-id", help="Conversation / saga id.")
@click.option(
    "--ttl-ms", type=click.IntRange(min=1, max=MAX_TTL_MS), help="Stale after this many milliseconds (up to 100 years)."
)
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

    The publish is mandatory: if no queue is bound to TYPE the broker returns the message and
    this exits 1 ("unroutable") instead of printing an id. Traces are exported when the standard
    OTEL_* variables ask for it (e.g. OTEL_TRACES_EXPORTER=otlp).

    Example: choreo publish order.placed '{"order_id": "o-1", ...}'
    """
    try:
        data = codec.loads_object(payload.encode())
    except MalformedMessage as exc:
        raise click.BadParameter(str(exc), param_hint="JSON") from None
    settings = Settings.from_env(amqp_url=url)
    try:
        envelope = new_envelope(
            event_type,
            data,
            source=source,
            id=event_id,
            dedup_key=dedup_key,
            correlation_id=correlation_id,
            ttl_ms=ttl_ms,
        )
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        raise click.BadParameter(first["msg"], param_hint=_PARAMS.get(field, field or None)) from None
    message = to_message(
        envelope, settings.keyring, settings.naming.exchange, expiration_slack_ms=settings.clock_skew_ms
    )
    # Mandatory: a message no queue receives is returned by the broker instead of dropped.
    message.mandatory = True
    # A PRODUCER span, as Publisher opens, when the OTEL_* variables turn tracing on.
    tracing.configure_from_env(service_name=source)
    traced = tracing.current()

    async def send() -> None:
        transport = RabbitMQTransport(settings.amqp_url, connection_name=f"choreo-publisher:{source}")
        await transport.connect()
        try:
            await publish_traced(transport, message, trace_id=envelope.trace_id, tracing=traced)
        except PublishNotConfirmed as exc:
            if str(exc).startswith("unroutable"):
                raise Unroutable(
                    f"unroutable: no queue is bound to {event_type} on {settings.naming.exchange}"
                ) from None
            raise
        finally:
            await transport.close()

    run(send())
    click.echo(envelope.id)
