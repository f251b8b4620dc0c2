"""Redis dedup store, shared by replicas of an agent on several hosts.

A claim is ``SET key claimed:<token> NX PX lease``, so a crashed holder's claim expires by
itself; a done mark is ``SET key done PX retention``, so cleanup is Redis's own expiry.
Release and complete check the token, so a replica never drops a claim that has since passed
to another. The only module that imports redis.
"""

from __future__ import annotations

import os
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from .base import ClaimResult, LeaseStoreMixin

__all__ = ["RedisDedupStore"]

# Delete the key only if it still holds our claim token.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# Renew the lease only while the key still holds our claim token.
_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# Mark done unless another holder's claim replaced ours (then its outcome decides).
_COMPLETE = """
local v = redis.call('GET', KEYS[1])
if v == false or v == ARGV[1] or v == 'done' then
  redis.call('SET', KEYS[1], 'done', 'PX', ARGV[2]) return 1
end
return 0
"""


# What Redis itself can raise: the CLI reports these in one line, as failures of the world outside.
BACKEND_ERRORS: tuple[type[Exception], ...] = (redis.exceptions.RedisError,)


class RedisDedupStore(LeaseStoreMixin):
    def __init__(
        self, url: str = "redis://127.0.0.1:6379/0", *, prefix: str = "choreo:dedup", retention_s: float = 7 * 86400
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.retention_ms = int(retention_s * 1000)
        self._client: Any = None
        self._tokens: dict[tuple[str, str], str] = {}

    @property
    def client(self) -> Any:
        if self._client is None:
            raise RuntimeError("RedisDedupStore is not open")
        return self._client

    def _key(self, agent: str, key: str) -> str:
        return f"{self.prefix}:{agent}:{key}"

    async def open(self) -> None:
        if self._client is None:
            self._client = aioredis.from_url(self.url, decode_responses=True)
            await self._client.ping()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def claim(self, agent: str, key: str, *, lease_s: float) -> ClaimResult:
        token = "claimed:" + os.urandom(8).hex()
        name = self._key(agent, key)
        if await self.client.set(name, token, nx=True, px=max(1, int(lease_s * 1000))):
            self._tokens[(agent, key)] = token
            return "claimed"
        value = await self.client.get(name)
        if value is None:  # expired or released in between
            return await self.claim(agent, key, lease_s=lease_s)
        return "done" if value == "done" else "busy"

    async def complete(self, agent: str, key: str) -> None:
        token = self._tokens.pop((agent, key), "")
        await self.client.eval(_COMPLETE, 1, self._key(agent, key), token, self.retention_ms)

    async def release(self, agent: str, key: str) -> None:
        token = self._tokens.pop((agent, key), None)
        if token is not None:
            await self.client.eval(_RELEASE, 1, self._key(agent, key), token)

    async def extend(self, agent: str, key: str, *, lease_s: float) -> None:
        token = self._tokens.get((agent, key))
        if token is not None:
            await self.client.eval(_EXTEND, 1, self._key(agent, key), token, max(1, int(lease_s * 1000)))

    async def cleanup(self, *, older_than_s: float) -> int:
        return 0  # done marks expire by themselves after the retention window
