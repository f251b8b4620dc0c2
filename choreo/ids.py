"""Event ids: UUIDv7 for root events, name-based UUIDs for emitted ones.

Emitted ids are a pure function of (handled id, agent, emitted type, ordinal) so that a
handler re-run after a redelivery re-emits the *same* ids and downstream dedup absorbs them.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid

__all__ = ["derived_id", "new_trace_id", "uuid7"]

_NAMESPACE = uuid.UUID("6f1c3b1e-6d1a-4c8e-9a57-63686f72656f")  # fixed forever: ids depend on it


def uuid7() -> str:
    """A time-ordered UUIDv7 (RFC 9562) as its canonical string."""
    ms = (time.time_ns() // 1_000_000) & 0xFFFF_FFFF_FFFF
    rand = os.urandom(10)
    # 48-bit milliseconds, version 7 and 12 random bits, variant 0b10 and 62 random bits;
    # built as bytes, since uuid.UUID costs more than the rest.
    raw = (ms.to_bytes(6, "big") + bytes((0x70 | (rand[0] & 0x0F), rand[1], 0x80 | (rand[2] & 0x3F))) + rand[3:]).hex()
    return f"{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:]}"


_NAMESPACE_BYTES = _NAMESPACE.bytes


def derived_id(handled_id: str, agent: str, event_type: str, ordinal: int) -> str:
    """The deterministic id of the ``ordinal``-th event of ``event_type`` emitted by ``agent``:
    ``uuid.uuid5`` of the four joined by U+001F, as its canonical string."""
    # RFC 9562 name-based SHA-1 done on bytes: uuid.uuid5 and str(UUID) take 2.5x as long.
    name = f"{handled_id}\x1f{agent}\x1f{event_type}\x1f{ordinal}".encode()
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name).digest()[:16])
    digest[6] = 0x50 | (digest[6] & 0x0F)  # version 5
    digest[8] = 0x80 | (digest[8] & 0x3F)  # variant 0b10
    raw = digest.hex()
    return f"{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:]}"


def new_trace_id() -> str:
    """A fresh W3C trace-id: 32 lowercase hex chars, never all zero."""
    while True:
        value = os.urandom(16).hex()
        if value != "0" * 32:
            return value
