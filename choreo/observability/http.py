"""The worker's HTTP port: ``/metrics``, ``/healthz`` and ``/readyz``.

A few lines of asyncio instead of a web framework: three GET routes, one response per
connection, on the worker's own event loop (so ``/healthz`` answering means the loop runs).

- ``/healthz``: 200 while the process and its event loop are alive. For liveness probes.
- ``/readyz``: 200 when connected to the broker **and** every agent's consumer is attached;
  503 otherwise (starting, reconnecting, a consumer cancelled by the broker, topology drift,
  shutting down). For readiness probes and load balancers.
- ``/metrics``: Prometheus text exposition.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from ..codec import dumps
from ..log import get_logger

__all__ = ["HealthServer", "Readiness"]

log = get_logger("choreo.http")

# (ready, details): details is shown as JSON by /readyz.
Readiness = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error", 503: "Unavailable"}
_MAX_REQUEST_BYTES = 8192


class HealthServer:
    def __init__(
        self,
        *,
        port: int,
        readiness: Readiness,
        metrics: Callable[[], Awaitable[tuple[bytes, str]]],
        host: str = "0.0.0.0",  # probes and Prometheus come from outside the container
    ) -> None:
        self.host = host
        self.requested_port = port
        self._readiness = readiness
        self._metrics = metrics
        self._server: asyncio.Server | None = None

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        """The bound port (the requested one, or the one the OS chose for port 0)."""
        if self._server is None or not self._server.sockets:
            return self.requested_port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.requested_port)
        log.info("http listening", host=self.host, port=self.port, paths=["/metrics", "/healthz", "/readyz"])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            method, path = _request_line(head)
            if method not in {"GET", "HEAD"}:
                status, body, ctype = 405, b"only GET and HEAD\n", "text/plain"
            else:
                status, body, ctype = await self._route(path)
            _respond(writer, status, body if method == "GET" else b"", ctype, length=len(body))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass  # a probe that hung up or sent garbage gets nothing; the worker does not care
        except Exception:
            log.exception("http handler failed")
            with contextlib.suppress(Exception):
                _respond(writer, 500, b"internal error\n", "text/plain", length=15)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _route(self, path: str) -> tuple[int, bytes, str]:
        path = path.split("?", 1)[0]
        if path == "/healthz":
            return 200, b"ok\n", "text/plain"
        if path == "/readyz":
            ready, details = await self._readiness()
            return (200 if ready else 503), dumps({"ready": ready, **details}) + b"\n", "application/json"
        if path == "/metrics":
            body, ctype = await self._metrics()
            return 200, body, ctype
        return 404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain"


def _request_line(head: bytes) -> tuple[str, str]:
    if len(head) > _MAX_REQUEST_BYTES:
        raise ValueError("request too large")
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3:
        raise ValueError(f"bad request line {line!r}")
    return parts[0], parts[1]


def _respond(writer: asyncio.StreamWriter, status: int, body: bytes, ctype: str, *, length: int) -> None:
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
        f"Content-Type: {ctype}\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
    )
    writer.write(head.encode("latin-1") + body)
