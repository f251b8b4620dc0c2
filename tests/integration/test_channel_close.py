"""Closing channels against the real broker: a close of ours crossing one of the broker's."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable

import pytest
from pamqp import commands as cmd

from choreo.testing import wait_for
from choreo.transport.amqp import frames
from choreo.transport.amqp.connection import ChannelClosedError
from choreo.transport.rabbitmq import RabbitMQTransport

pytestmark = pytest.mark.rabbitmq


async def test_a_close_crossing_the_brokers_frees_the_number_with_the_brokers_close_ok(
    rabbit_factory: Callable[[], Awaitable[RabbitMQTransport]],
) -> None:
    """The broker answers our close even after it closed the channel itself, so keeping the
    number until that close-ok (rather than freeing it at the broker's close) leaks nothing."""
    transport = await rabbit_factory()
    conn = transport._link.conn
    assert conn is not None
    channel = await conn.channel()
    # In one write: a request the broker refuses by closing the channel, then our own close.
    missing = f"choreo-missing-{secrets.token_hex(4)}"
    channel.send(frames.encode_method(channel.number, cmd.Queue.Declare(queue=missing, passive=True)))
    await channel.close()
    # The closes crossed: the channel ended with the broker's close, not with our close-ok.
    assert isinstance(channel.closed, ChannelClosedError)
    assert channel.closed.reply_code == 404
    await wait_for(lambda: channel.number not in conn._channels, within=10, what="the broker's close-ok for our close")
    assert conn.is_open
    again = await conn.channel()  # the connection goes on, and a channel works on it
    await again.rpc(cmd.Queue.Declare(queue="", exclusive=True, auto_delete=True), cmd.Queue.DeclareOk)
    await again.close()
