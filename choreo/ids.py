"""Event ids: UUIDv7 for root events, name-based UUIDs for emitted ones.

Emitted ids are a pure function of (handled id, agent, emitted type, ordinal) so that a
handler re-run after a redelivery re-emits the *same* ids and downstream dedup absorbs them.
"""

from __future__ import annotations

import os
import time
import uuid

__all__ = ["derived_id", "new_trace_id", "uuid7"]

_NAMESPACE = uuid.UUID("6f1c3b1e-6d1a-4c8e-9a57-63686f72656f")  # fixed forever: ids depend on it


def uuid7() -> str:
    """A time-ordered UUIDv7 (RFC 9562) as its canonical string."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version
    value |= ((rand >> 62) & 0xFFF) << 64  # rand_a, 12 bits
    value |= 0b10 << 62  # variant
    value |= rand & ((1 << 62) - 1)  # rand_b, 62 bits
    return str(uuid.UUID(int=value))


def derived_id(handled_id: str, agent: str, event_type: str, ordinal: int) -> str:
    """The deterministic id of the ``ordinal``-th event of ``event_type`` emitted by ``agent``."""
    return str(uuid.uuid5(_NAMESPACE, f"{handled_id}\x1f{agent}\x1f{event_type}\x1f{ordinal}"))


def new_trace_id() -> str:
    """A fresh W3C trace-id: 32 lowercase hex chars, never all zero."""
    while True:
        value = os.urandom(16).hex()
        if value != "0" * 32:
            return value
