"""``amqps://``: choreo's client over TLS, against the local broker behind a TLS-terminating proxy.

The local broker has no TLS listener, so the test puts one in front of it: a proxy that
accepts TLS with a certificate from a throwaway CA (optionally asking for a client
certificate) and forwards the plain bytes to the broker. What is tested is the client side:
certificate verification against ``cafile``, ``no_verify_ssl``, the client certificate
(``certfile``/``keyfile``) and that whole AMQP sessions (declare, confirmed publish, consume)
run over the encrypted connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import secrets
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlparse

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from choreo.errors import TransportError
from choreo.topology import QueueSpec, Topology
from choreo.transport import Delivery, OutgoingMessage
from choreo.transport.rabbitmq import RabbitMQTransport

pytestmark = pytest.mark.rabbitmq


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _write_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return key


def _issue(
    path: Path,
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    issuer: x509.Name | None = None,
    ca: bool = False,
) -> x509.Certificate:
    """A certificate for ``subject`` signed by ``issuer_key`` (self-signed when ``issuer`` is None);
    leaf certificates name localhost and 127.0.0.1."""
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    cert = builder.sign(issuer_key, hashes.SHA256())
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key = _write_key(d / "ca.key")
    ca = _issue(d / "ca.pem", "choreo test CA", ca_key, ca_key, ca=True)
    server_key = _write_key(d / "server.key")
    _issue(d / "server.pem", "localhost", server_key, ca_key, issuer=ca.subject)
    client_key = _write_key(d / "client.key")
    _issue(d / "client.pem", "choreo-test-client", client_key, ca_key, issuer=ca.subject)
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key")


class TlsProxy:
    """Accepts TLS, forwards plain bytes to the broker; counts the handshakes it completed."""

    def __init__(self, target: tuple[str, int], context: ssl.SSLContext) -> None:
        self.target = target
        self.context = context
        self.server: asyncio.Server | None = None
        self.handshakes = 0
        self.client_subjects: list[str] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1
        peer = writer.get_extra_info("peercert")
        if peer:
            self.client_subjects.append(dict(x[0] for x in peer["subject"])["commonName"])
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError, ssl.SSLError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)


def server_context(pki: Pki, *, require_client_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    if require_client_cert:
        context.load_verify_locations(pki.ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@pytest.fixture
async def tls_broker(amqp_url: str, pki: Pki) -> AsyncIterator[tuple[TlsProxy, str]]:
    """A TLS proxy to the broker; yields it and the ``amqps://`` URL base (no query)."""
    parsed = urlparse(amqp_url)
    proxy = TlsProxy(
        (parsed.hostname or "127.0.0.1", parsed.port or 5672), server_context(pki, require_client_cert=False)
    )
    port = await proxy.start()
    user, password = quote(parsed.username or "guest"), quote(parsed.password or "guest")
    yield proxy, f"amqps://{user}:{password}@localhost:{port}/"
    await proxy.close()


async def round_trip(url: str) -> bytes:
    """Declare a queue, publish one message (confirmed) and consume it, all over ``url``."""
    name = f"choreo-tls-{secrets.token_hex(4)}"
    transport = RabbitMQTransport(url, timeout=5)
    await transport.connect()
    try:
        await transport.declare(Topology(f"{name}.x", (QueueSpec(name, {}, ("t.#",)),)))
        got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def on_delivery(delivery: Delivery) -> None:
            await delivery.ack()
            if not got.done():
                got.set_result(delivery.body)

        sub = await transport.subscribe(name, on_delivery, prefetch=4)
        await transport.publish(OutgoingMessage(exchange=f"{name}.x", routing_key="t.tls", body=b"over tls"))
        body = await asyncio.wait_for(got, 10)
        await sub.cancel()
        return body
    finally:
        with contextlib.suppress(Exception):
            await transport.delete_queue(name)
            await transport.delete_exchange(f"{name}.x")
        await transport.close()


async def test_amqps_with_the_ca_file_verifies_the_broker_and_carries_whole_sessions(
    tls_broker: tuple[TlsProxy, str], pki: Pki
) -> None:
    proxy, base = tls_broker
    assert await round_trip(f"{base}?cafile={quote(str(pki.ca))}") == b"over tls"
    assert proxy.handshakes >= 1  # every byte went through the TLS listener


async def test_amqps_refuses_a_broker_certificate_it_cannot_verify(tls_broker: tuple[TlsProxy, str]) -> None:
    _, base = tls_broker
    transport = RabbitMQTransport(base, timeout=5)  # the system trust store knows no test CA
    with pytest.raises(TransportError, match="certificate verify failed"):
        await transport.connect()
    await transport.close()


async def test_no_verify_ssl_connects_without_the_ca(tls_broker: tuple[TlsProxy, str]) -> None:
    _, base = tls_broker
    assert await round_trip(f"{base}?no_verify_ssl=1") == b"over tls"


async def test_client_certificate_is_presented_when_the_broker_asks_for_one(amqp_url: str, pki: Pki) -> None:
    parsed = urlparse(amqp_url)
    proxy = TlsProxy(
        (parsed.hostname or "127.0.0.1", parsed.port or 5672), server_context(pki, require_client_cert=True)
    )
    port = await proxy.start()
    try:
        base = f"amqps://{quote(parsed.username or 'guest')}:{quote(parsed.password or 'guest')}@localhost:{port}/"
        query = (
            f"cafile={quote(str(pki.ca))}&certfile={quote(str(pki.client_cert))}&keyfile={quote(str(pki.client_key))}"
        )
        assert await round_trip(f"{base}?{query}") == b"over tls"
        assert "choreo-test-client" in proxy.client_subjects
        without = RabbitMQTransport(f"{base}?cafile={quote(str(pki.ca))}", timeout=5)
        with pytest.raises(TransportError):  # the listener closes a connection with no client certificate
            await without.connect()
        await without.close()
    finally:
        await proxy.close()
