"""CHOREO_AMQP_URL with several comma-separated URLs: parsing, and the connection's rotation.

The failover against real nodes is ``tests/cluster/test_cluster.py``; here, parsing, the order
in which URLs are tried, and the error naming each one that failed.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from choreo.errors import ConfigError, TransportError
from choreo.transport import rabbitmq
from choreo.transport.amqp.connection import ConnectionClosedError, Endpoint
from choreo.transport.rabbitmq import RabbitMQTransport, amqp_urls


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


class FakeConnection:
    def __init__(self, port: int) -> None:
        self.port = port
        self.is_open = True
        self.on_lost: object = None
        self.on_blocked: object = None
        self.blocked: str | None = None
        self.closed: Exception | None = None

    async def close(self) -> None:
        self.is_open = False


def scripted_open(monkeypatch: pytest.MonkeyPatch, failures: int) -> list[int]:
    """Connection.open fails ``failures`` times, then succeeds; returns the ports tried."""
    tried: list[int] = []

    async def fake_open(endpoint: Endpoint, *, name: str, within: float) -> FakeConnection:
        tried.append(endpoint.port)
        if len(tried) <= failures:
            raise ConnectionClosedError("refused")
        return FakeConnection(endpoint.port)

    monkeypatch.setattr(rabbitmq.Connection, "open", fake_open)
    monkeypatch.setattr(rabbitmq, "_RESTORE_BACKOFF_S", (0.0,))
    return tried


async def test_each_lost_connection_or_failed_attempt_moves_to_the_next_url(monkeypatch: pytest.MonkeyPatch) -> None:
    link = rabbitmq._Link(["amqp://h1:5681/", "amqp://h2:5682/", "amqp://h3:5683/"], "t", 1.0)
    tried = scripted_open(monkeypatch, failures=0)
    await link.connect()
    assert tried == [5681]
    tried.clear()
    scripted_open_after = scripted_open(monkeypatch, failures=3)
    link._on_lost(ConnectionClosedError("gone"))
    await asyncio.wait_for(link.wait_up(), 5)
    assert scripted_open_after == [5682, 5683, 5681, 5682]
    assert link.at == 1
    await link.close()
    link._on_lost(ConnectionClosedError("closing"))
    assert link._reconnect_task is None or link._reconnect_task.done(), "a link closed on purpose stays closed"


async def test_one_url_never_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    link = rabbitmq._Link(["amqp://guest:guest@localhost:5672/"], "t", 1.0)
    tried = scripted_open(monkeypatch, failures=0)
    await link.connect()
    tried.clear()
    tried = scripted_open(monkeypatch, failures=2)
    link._on_lost(ConnectionClosedError("gone"))
    await asyncio.wait_for(link.wait_up(), 5)
    assert tried == [5672, 5672, 5672]
    await link.close()


async def test_a_connection_closed_in_the_read_that_opened_it_is_a_failed_attempt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The broker's close can arrive with open-ok (a node shutting down). Adopted, that
    connection would never report its loss (``on_lost`` was not set yet when it came), and the
    link would stay "up" on a dead connection for good."""
    link = rabbitmq._Link(["amqp://h1:5681/", "amqp://h2:5682/"], "t", 1.0)
    tried: list[int] = []

    async def open_closed_first(endpoint: Endpoint, *, name: str, within: float) -> FakeConnection:
        tried.append(endpoint.port)
        conn = FakeConnection(endpoint.port)
        if len(tried) in {1, 3}:  # the first connect, and the first reconnect
            conn.closed, conn.is_open = ConnectionClosedError("320 CONNECTION_FORCED - shutdown"), False
        return conn

    monkeypatch.setattr(rabbitmq.Connection, "open", open_closed_first)
    await link.connect()
    assert tried == [5681, 5682]
    assert link.conn is not None
    assert link.conn.closed is None
    link._attached_at -= rabbitmq._FLAP_S  # an old connection: no flap pause
    link._on_lost(ConnectionClosedError("gone"))
    await asyncio.wait_for(link.wait_up(), 5)
    assert tried == [5681, 5682, 5681, 5682]
    assert link.conn.closed is None
    assert link.connected
    await link.close()


async def test_connections_lost_soon_after_opening_are_reopened_ever_more_slowly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connection that dies at once (a poison message closing it on every delivery) must
    not be reopened in a tight loop; one that lived past the flap window starts afresh."""
    monkeypatch.setattr(rabbitmq, "_RESTORE_BACKOFF_S", (0.001, 0.002, 0.003))
    link = rabbitmq._Link(["amqp://h1:5681/"], "t", 1.0)
    scripted_open(monkeypatch, failures=0)
    await link.connect()
    flaps = []
    for _ in range(4):
        link._on_lost(ConnectionClosedError("gone at once"))
        await asyncio.wait_for(link.wait_up(), 5)
        flaps.append(link._flaps)
    assert flaps == [1, 2, 3, 4]
    link._attached_at -= rabbitmq._FLAP_S
    link._on_lost(ConnectionClosedError("gone after a while"))
    await asyncio.wait_for(link.wait_up(), 5)
    assert link._flaps == 0
    await link.close()


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
