"""A producer that is not choreo: body and signature built by hand, published with plain AMQP.

This is what a Java service or a shell script does with ``wire-format.md``; choreo must handle
it, and must dead-letter the same body with one byte changed without ever handling it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import shutil
import subprocess
from collections.abc import Awaitable, Callable

import aio_pika
import pytest

from choreo import Agent, Context, Event, Publisher, Settings, Worker
from choreo.errors import HeadersNotSendable
from choreo.publisher import new_envelope
from choreo.testing import wait_for
from choreo.topology import QueueSpec, Topology
from choreo.transport.amqp.frames import U16, U32, encode_publish, encode_table
from choreo.transport.base import RAW_PROPERTIES, OutgoingMessage
from choreo.transport.rabbitmq import RabbitMQTransport

from ..conftest import SECRET

pytestmark = pytest.mark.rabbitmq


class RawOrderPlaced(Event, type="order.placed"):
    order_id: str


def hmac_hex(body: bytes, secret: str) -> str:
    """As `openssl dgst -sha256 -hmac SECRET -hex` computes it (via openssl when installed)."""
    openssl = shutil.which("openssl")
    if openssl:
        out = subprocess.run(
            [openssl, "dgst", "-sha256", "-hmac", secret, "-hex"], input=body, capture_output=True, check=True
        ).stdout.decode()
        return out.strip().rsplit("= ", 1)[-1]
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


async def test_hand_built_event_is_handled_and_tampered_copy_is_dead_lettered(
    rabbit_factory: Callable[[], Awaitable[RabbitMQTransport]], settings: Settings, amqp_url: str
) -> None:
    handled: list[str] = []
    agent: Agent[None] = Agent("rawsink")

    @agent.on(RawOrderPlaced)
    async def on_order(event: RawOrderPlaced, ctx: Context[None]) -> None:
        handled.append(event.order_id)

    worker = Worker([agent], settings=settings, transport=await rabbit_factory())
    await worker.start()
    try:
        body = (
            b'{"id":"e-raw-1","type":"order.placed","source":"shop","issued_at":"2026-11-20T10:00:00Z",'
            b'"trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","payload":{"order_id":"o-raw-1"}}'
        )
        signature = hmac_hex(body, SECRET)
        assert signature == hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        tampered = body.replace(b"o-raw-1", b"o-raw-2")
        assert len(tampered) == len(body)
        assert sum(a != b for a, b in zip(body, tampered, strict=True)) == 1

        connection = await aio_pika.connect(amqp_url)
        try:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(settings.naming.exchange, ensure=True)
            headers: dict[str, aio_pika.abc.FieldValue] = {
                "x-choreo-alg": "hmac-sha256",
                "x-choreo-kid": "k1",
                "x-choreo-sig": signature,
            }
            # No message_id, no type: plain CLI publishers cannot set them and choreo must not need them.
            await exchange.publish(
                aio_pika.Message(body, headers=headers, content_type="application/json", delivery_mode=2),
                routing_key="order.placed",
            )
            await wait_for(lambda: handled == ["o-raw-1"], within=10, what="the hand-built event to be handled")

            await exchange.publish(
                aio_pika.Message(tampered, headers=headers, content_type="application/json", delivery_mode=2),
                routing_key="order.placed",
            )
            await wait_for(
                lambda: worker.runtimes[0].stats.dead_lettered["signature"] == 1, within=10, what="dead-lettering"
            )
            dlq = await channel.get_queue(settings.naming.agent_queues("rawsink").dlq, ensure=True)
            message = await dlq.get(fail=False)
            assert message is not None, "tampered message never reached the DLQ"
            assert message.body == tampered
            assert message.headers["x-choreo-reason"] == "signature"
            assert message.headers["x-choreo-sig"] == signature  # signature kept for a later replay
            assert message.headers["x-choreo-agent"] == "rawsink"
            assert message.headers["x-choreo-original-routing-key"] == "order.placed"
            await message.ack()
        finally:
            await connection.close()
        assert handled == ["o-raw-1"], "the tampered event must never reach the handler"
    finally:
        await worker.stop()


@pytest.mark.skipif(shutil.which("amqp-publish") is None, reason="amqp-tools (amqp-publish) not installed")
async def test_the_shell_recipe_of_the_wire_format_doc_works(
    rabbit_factory: Callable[[], Awaitable[RabbitMQTransport]], settings: Settings, amqp_url: str
) -> None:
    """The exact commands of wire-format.md: printf | openssl dgst, then amqp-publish."""
    handled: list[str] = []
    agent: Agent[None] = Agent("shellsink")

    @agent.on(RawOrderPlaced)
    async def on_order(event: RawOrderPlaced, ctx: Context[None]) -> None:
        handled.append(event.order_id)

    worker = Worker([agent], settings=settings, transport=await rabbit_factory())
    await worker.start()
    script = """
body='{"id":"e-1","type":"order.placed","source":"shop","issued_at":"2026-11-20T10:00:00Z","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","payload":{"order_id":"o-1"}}'
sig=$(printf '%s' "$body" | openssl dgst -sha256 -hmac "$SECRET" -hex | sed 's/^.*= //')
amqp-publish --url="$URL" -e "$EXCHANGE" -r order.placed -p -C application/json \
  -H "x-choreo-alg: hmac-sha256" -H "x-choreo-kid: k1" -H "x-choreo-sig: $sig" -b "$body"
"""
    try:
        # amqp-tools reads a trailing "/" as the empty vhost name; without it, the default "/".
        url = amqp_url[:-1] if amqp_url.endswith("/") else amqp_url
        env = {"SECRET": SECRET, "URL": url, "EXCHANGE": settings.naming.exchange, "PATH": "/usr/bin:/bin"}
        proc = await asyncio.create_subprocess_exec(
            "bash", "-c", script, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, (out + err).decode()
        await wait_for(lambda: handled == ["o-1"], within=10, what="the shell-published event to be handled")
        assert worker.runtimes[0].stats.dead_lettered_total == 0
    finally:
        await worker.stop()


async def test_publishers_set_amqp_expiration_from_ttl_plus_skew_tolerance(
    rabbit_factory: Callable[[], Awaitable[RabbitMQTransport]], settings: Settings, amqp_url: str
) -> None:
    transport = await rabbit_factory()
    sink = f"{settings.naming.queue_prefix}ttlsink"
    await transport.declare(Topology(settings.naming.exchange, (QueueSpec(sink, {}, ("order.placed",)),)))
    async with Publisher(transport=transport, settings=settings, source="t") as publisher:
        await publisher.publish(RawOrderPlaced(order_id="o-ttl"), ttl_ms=60_000)
        await publisher.publish(RawOrderPlaced(order_id="o-forever"))
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(sink, ensure=True)
        with_ttl = await queue.get(fail=True)
        without = await queue.get(fail=True)
        # aio-pika reports the AMQP expiration in seconds; the wire carries milliseconds.
        assert with_ttl.expiration == pytest.approx((60_000 + settings.clock_skew_ms) / 1000)
        assert without.expiration is None
        await with_ttl.ack()
        await without.ack()
    finally:
        await connection.close()


async def test_properties_choreo_cannot_decode_dead_letter_the_message_and_keep_the_connection(
    rabbit_factory: Callable[[], Awaitable[RabbitMQTransport]], settings: Settings
) -> None:
    """RabbitMQ passes header names and short strings through as bytes, so a producer can send
    ones that are not UTF-8. The worker used to drop its whole connection on such a message,
    which brought the message (and every other unacked one) back, again and again: now it is
    dead-lettered as ``malformed``, its raw properties kept, and the next message is handled."""
    handled: list[str] = []
    agent: Agent[None] = Agent("oddprops")

    @agent.on(RawOrderPlaced)
    async def on_order(event: RawOrderPlaced, ctx: Context[None]) -> None:
        handled.append(event.order_id)

    worker_transport = await rabbit_factory()
    worker = Worker([agent], settings=settings, transport=worker_transport)
    await worker.start()
    try:
        connection = worker_transport._link.conn
        assert connection is not None
        body = new_envelope("order.placed", {"order_id": "o-odd"}, source="java-shop").encode()
        signature = encode_table(dict(settings.keyring.sign(body)))[4:]
        odd_name = b"\x04caf\xe9S" + U32.pack(1) + b"v"  # a header named "café" in Latin-1
        raw = U16.pack(0x2000) + U32.pack(len(signature + odd_name)) + signature + odd_name

        producer = await rabbit_factory()
        channel = await (await producer._link.up()).channel()
        await channel.confirm_select()
        await channel.publish(encode_publish(channel.number, settings.naming.exchange, "order.placed", body, raw))
        await Publisher(transport=producer, settings=settings, source="shop").publish(RawOrderPlaced(order_id="o-ok"))

        stats = worker.runtimes[0].stats
        await wait_for(lambda: handled == ["o-ok"], within=10, what="the good event after the odd one")
        await wait_for(lambda: stats.dead_lettered["malformed"] == 1, within=10, what="the odd one dead-lettered")
        assert worker_transport._link.conn is connection, "the connection was dropped"
        assert connection.is_open

        dead = await producer.get(settings.naming.agent_queues("oddprops").dlq)
        assert dead is not None
        assert dead.body == body
        assert dead.headers["x-choreo-reason"] == "malformed"
        assert "could not be decoded" in str(dead.headers["x-choreo-error"])
        assert dead.headers[RAW_PROPERTIES] == raw
        await dead.ack()
    finally:
        await worker.stop()


async def test_a_publish_whose_headers_exceed_frame_max_fails_at_once_and_keeps_the_connection(
    rabbit_factory: Callable[[], Awaitable[RabbitMQTransport]], settings: Settings
) -> None:
    """The broker closes the whole connection on an oversized header frame; sent anyway and
    retried as a lost connection, one such publish used to drop it dozens of times a second."""
    transport = await rabbit_factory()
    connection = await transport._link.up()
    message = OutgoingMessage(settings.naming.exchange, "order.placed", b"{}", headers={"big": "x" * 140_000})
    with pytest.raises(HeadersNotSendable, match="cannot be split"):
        await transport.publish(message)
    assert transport._link.conn is connection
    assert connection.is_open
    await transport.declare(Topology(settings.naming.exchange, ()))
    await transport.publish(OutgoingMessage(settings.naming.exchange, "order.placed", b"{}"))  # still usable
