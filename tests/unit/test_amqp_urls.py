"""CHOREO_AMQP_URL with several comma-separated URLs: parsing, and the connection's rotation.

The failover against real nodes is ``tests/cluster/test_cluster.py``; here, parsing, the order
in which URLs are tried, and the error naming each one that failed.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
from yarl import URL

from choreo.errors import ConfigError, TransportError
from choreo.transport.rabbitmq import RabbitMQTransport, _FailoverConnection, amqp_urls


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("amqp://guest:guest@localhost:5672/", ("amqp://guest:guest@localhost:5672/",)),
        ("amqp://h1:5681/,amqp://h2:5682/", ("amqp://h1:5681/", "amqp://h2:5682/")),
        (
            " amqp://u:p@h1:5681/vh , amqps://u:p@h2:5682/vh?heartbeat=10 ,",
            ("amqp://u:p@h1:5681/vh", "amqps://u:p@h2:5682/vh?heartbeat=10"),
        ),
        # A comma belongs to a URL unless another URL starts right after it.
        ("amqp://u:pa,ss@h1/,amqp://u:pa,ss@h2/", ("amqp://u:pa,ss@h1/", "amqp://u:pa,ss@h2/")),
        ("amqp://h1/?name=a,b,AMQP://h2/", ("amqp://h1/?name=a,b", "AMQP://h2/")),
        (",amqp://h1/,,amqp://h2/", ("amqp://h1/", "amqp://h2/")),
        ("amqp://[::1]:5672/", ("amqp://[::1]:5672/",)),
    ],
)
def test_urls_are_split_in_order(value: str, expected: tuple[str, ...]) -> None:
    assert amqp_urls(value) == expected


@pytest.mark.parametrize(
    "value",
    ["", " , ", "http://h1/", "amqp:///", "amqp://h1:port/", "amqp://h1/,ftp://h2/", "amqp://h 1/", "h1:5672"],
)
def test_bad_urls_are_a_config_error(value: str) -> None:
    with pytest.raises(ConfigError):
        amqp_urls(value)


def test_the_error_does_not_show_the_password() -> None:
    with pytest.raises(ConfigError) as raised:
        amqp_urls("amqp://guest:s3cret@:5672/")
    assert "s3cret" not in str(raised.value)


def test_the_transport_parses_at_construction() -> None:
    transport = RabbitMQTransport("amqp://h1:5681/, amqp://h2:5682/")
    assert transport.urls == ("amqp://h1:5681/", "amqp://h2:5682/")
    assert RabbitMQTransport("amqp://guest:guest@localhost:5672/").urls == ("amqp://guest:guest@localhost:5672/",)
    with pytest.raises(ConfigError):
        RabbitMQTransport("localhost:5672")


async def _closed(exc: BaseException) -> asyncio.Future[None]:
    closing: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    closing.set_exception(exc)
    return closing


async def test_each_lost_connection_or_failed_attempt_moves_to_the_next_url() -> None:
    urls = [URL("amqp://h1:5681/"), URL("amqp://h2:5682/"), URL("amqp://h3:5683/")]
    conn = _FailoverConnection(urls)
    assert conn.url == urls[0]
    seen = []
    for _ in range(4):
        await conn._on_connection_close(await _closed(ConnectionError("gone")))
        seen.append(conn.url)
    assert seen == [urls[1], urls[2], urls[0], urls[1]]
    await conn.close()
    await conn._on_connection_close(await _closed(ConnectionError("closing")))
    assert conn.url == urls[1], "a connection closed on purpose does not move on"


async def test_one_url_never_changes() -> None:
    url = URL("amqp://guest:guest@localhost:5672/")
    conn = _FailoverConnection([url])
    await conn._on_connection_close(await _closed(ConnectionError("gone")))
    assert conn.url == url
    await conn.close()


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_connect_names_every_url_that_failed() -> None:
    first, second = _closed_port(), _closed_port()
    transport = RabbitMQTransport(
        f"amqp://guest:s3cret@127.0.0.1:{first}/,amqp://guest:s3cret@127.0.0.1:{second}/", timeout=2
    )
    with pytest.raises(TransportError) as raised:
        await transport.connect()
    message = str(raised.value)
    assert f"127.0.0.1:{first}" in message
    assert f"127.0.0.1:{second}" in message
    assert "s3cret" not in message
    assert not transport.connected


async def test_one_url_that_fails_reads_as_before() -> None:
    port = _closed_port()
    transport = RabbitMQTransport(f"amqp://guest:guest@127.0.0.1:{port}/", timeout=2)
    with pytest.raises(
        TransportError, match=rf"^cannot connect to RabbitMQ at amqp://guest:\*\*\*@127.0.0.1:{port}/: "
    ):
        await transport.connect()


@pytest.mark.rabbitmq
async def test_connect_skips_a_dead_node_and_uses_the_next(amqp_url: str) -> None:
    dead = f"amqp://guest:guest@127.0.0.1:{_closed_port()}/"
    transport = RabbitMQTransport(f"{dead},{amqp_url}", connection_name="choreo-tests-failover", timeout=5)
    await transport.connect()
    try:
        assert transport.connected
        host_port = amqp_url.rsplit("@", maxsplit=1)[-1]
        assert transport.connected_url is not None
        assert transport.connected_url.endswith(host_port)
    finally:
        await transport.close()


def test_the_management_api_of_a_cluster_url_is_the_first_nodes() -> None:
    from choreo.management import management_for

    api = management_for("amqp://u:p,w@h1:5681/v,amqp://u:p@h2:5682/")
    assert (api.base_url, api.user, api.password, api.vhost) == ("http://h1:15672", "u", "p,w", "v")
