"""RabbitMQ management HTTP API (read-only), for what AMQP cannot tell: every argument of a
queue and its bindings. Standard library only; optional: callers fall back to AMQP when the
plugin is not enabled.
"""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

__all__ = ["Management", "management_for"]


@dataclass(frozen=True)
class Management:
    base_url: str  # e.g. http://localhost:15672
    user: str
    password: str
    vhost: str = "/"
    timeout_s: float = 5.0

    def _get(self, path: str) -> Any:
        request = urllib.request.Request(self.base_url.rstrip("/") + path)
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            return json.loads(response.read())

    async def get(self, path: str) -> Any:
        return await asyncio.to_thread(self._get, path)

    async def queue(self, name: str) -> dict[str, Any] | None:
        """The queue's record (``arguments``, ``messages_ready``, ``consumers``...), or None."""
        try:
            return dict(await self.get(f"/api/queues/{self._vhost}/{urllib.parse.quote(name, safe='')}"))
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    async def bindings(self, queue: str, exchange: str) -> set[str]:
        """Routing keys binding ``exchange`` to ``queue``."""
        quote = urllib.parse.quote
        path = f"/api/bindings/{self._vhost}/e/{quote(exchange, safe='')}/q/{quote(queue, safe='')}"
        return {str(b["routing_key"]) for b in await self.get(path)}

    async def queue_names(self) -> list[str]:
        return sorted(str(q["name"]) for q in await self.get(f"/api/queues/{self._vhost}?columns=name"))

    async def available(self) -> bool:
        try:
            await self.get("/api/overview")
        except (OSError, urllib.error.URLError, ValueError):
            return False
        return True

    @property
    def _vhost(self) -> str:
        return urllib.parse.quote(self.vhost, safe="")


def management_for(amqp_url: str, api_url: str | None = None) -> Management:
    """The API next to ``amqp_url`` (same host, port 15672, same credentials) unless given.
    With several node URLs (a cluster), the first node's API: every node serves the cluster's."""
    from .transport.rabbitmq import amqp_urls  # one parser for CHOREO_AMQP_URL

    parsed = urllib.parse.urlparse(amqp_urls(amqp_url)[0])
    base = api_url or f"http://{parsed.hostname or 'localhost'}:15672"
    vhost = urllib.parse.unquote(parsed.path[1:]) if parsed.path not in ("", "/") else "/"
    return Management(base, parsed.username or "guest", parsed.password or "guest", vhost)
