"""Settings from ``CHOREO_*`` environment variables; explicit arguments override them.

| variable | default | meaning |
|---|---|---|
| CHOREO_AMQP_URL | amqp://guest:guest@localhost:5672/ | broker; comma-separated URLs of cluster nodes fail over |
| CHOREO_EXCHANGE | choreo.events | events topic exchange |
| CHOREO_QUEUE_PREFIX | (empty) | prefix for agent queue names |
| CHOREO_STATE_DIR | .choreo | where SQLite state and dedup files live |
| CHOREO_PREFETCH | 64 | unacked deliveries per agent |
| CHOREO_DELIVERY_LIMIT | 10 | quorum queue x-delivery-limit |
| CHOREO_MAX_BODY_BYTES | 1048576 | larger bodies are dead-lettered as malformed |
| CHOREO_CLOCK_SKEW_MS | 5000 | tolerance added to ttl_ms before an event counts as expired |
| CHOREO_SHUTDOWN_GRACE_S | 30 | how long shutdown waits for in-flight handlers |
| CHOREO_CONSUMER_TIMEOUT_MS | 1800000 | the broker's consumer_timeout; no message is held unacked that long |
| CHOREO_DEDUP_URL | sqlite: | dedup store: sqlite:[///path], postgresql://..., redis://..., memory: |
| CHOREO_DEDUP_TRANSACTIONAL | 0 | PostgreSQL only: handler writes and dedup mark commit together |
| CHOREO_DEDUP_LEASE_S | 30 | claim lease, renewed while the handler runs; a crashed holder's claims free up after it |
| CHOREO_SETTLE_WINDOW_MS | 10 | a handled message's done mark, then its ack, each wait at most this long for company |
| CHOREO_DEDUP_RETENTION_S | 604800 | how long done keys are kept (duplicates later than this are not caught) |
| CHOREO_HTTP_PORT | (off) | worker HTTP port for /metrics, /healthz, /readyz (0: any free port) |
| CHOREO_HEARTBEAT_S | 5 | heartbeat interval on the control exchange (0: none) |
| CHOREO_GC_TUNING | 1 | freeze start-up objects out of the collector, collect less often (0: Python's defaults) |
| CHOREO_LOG_LEVEL | info | debug also logs every handled message and suppressed duplicate |
| CHOREO_SIGNING_KEYS etc. | | see :meth:`choreo.signing.Keyring.from_env` |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .signing import Keyring
from .topology import DEFAULT_DELIVERY_LIMIT, DEFAULT_EXCHANGE, Naming

__all__ = ["DEFAULT_AMQP_URL", "Settings"]

DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/"


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be <= {maximum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value < 0:
        raise ConfigError(f"{name} must be >= 0, got {value}")
    return value


@dataclass(frozen=True)
class Settings:
    amqp_url: str = DEFAULT_AMQP_URL
    naming: Naming = field(default_factory=Naming)
    state_dir: Path = Path(".choreo")
    prefetch: int = 64
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT
    max_body_bytes: int = 1 << 20
    clock_skew_ms: int = 5000
    shutdown_grace_s: float = 30.0
    consumer_timeout_ms: int = 1_800_000
    dedup_url: str = "sqlite:"
    dedup_transactional: bool = False
    dedup_retention_s: float = 7 * 86400.0
    dedup_lease_s: float = 30.0
    settle_window_ms: int = 10  # see choreo.transport.rabbitmq._Acks and the SQLite store
    http_port: int | None = None  # /metrics, /healthz, /readyz; None: no HTTP server
    heartbeat_s: float = 5.0  # 0: no heartbeats
    gc_tuning: bool = True  # see choreo.worker.tune_gc
    keyring: Keyring = field(default_factory=Keyring)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if environ is None else environ
        settings = cls(
            amqp_url=env.get("CHOREO_AMQP_URL") or DEFAULT_AMQP_URL,
            naming=Naming(
                exchange=env.get("CHOREO_EXCHANGE") or DEFAULT_EXCHANGE,
                queue_prefix=env.get("CHOREO_QUEUE_PREFIX", ""),
            ),
            state_dir=Path(env.get("CHOREO_STATE_DIR") or ".choreo"),
            prefetch=_int(env, "CHOREO_PREFETCH", 64, minimum=1),
            delivery_limit=_int(env, "CHOREO_DELIVERY_LIMIT", DEFAULT_DELIVERY_LIMIT, minimum=1),
            max_body_bytes=_int(env, "CHOREO_MAX_BODY_BYTES", 1 << 20, minimum=1),
            clock_skew_ms=_int(env, "CHOREO_CLOCK_SKEW_MS", 5000),
            shutdown_grace_s=float(_int(env, "CHOREO_SHUTDOWN_GRACE_S", 30)),
            consumer_timeout_ms=_int(env, "CHOREO_CONSUMER_TIMEOUT_MS", 1_800_000, minimum=1000),
            dedup_url=env.get("CHOREO_DEDUP_URL") or "sqlite:",
            dedup_transactional=env.get("CHOREO_DEDUP_TRANSACTIONAL", "").lower() in {"1", "true", "yes"},
            dedup_retention_s=float(_int(env, "CHOREO_DEDUP_RETENTION_S", 7 * 86400, minimum=1)),
            dedup_lease_s=float(_int(env, "CHOREO_DEDUP_LEASE_S", 30, minimum=1)),
            settle_window_ms=_int(env, "CHOREO_SETTLE_WINDOW_MS", 10),
            http_port=_int(env, "CHOREO_HTTP_PORT", 0, maximum=65535) if env.get("CHOREO_HTTP_PORT") else None,
            heartbeat_s=_float(env, "CHOREO_HEARTBEAT_S", 5.0),
            gc_tuning=env.get("CHOREO_GC_TUNING", "1").lower() not in {"0", "false", "no"},
            keyring=Keyring.from_env(env),
        )
        return replace(settings, **{k: v for k, v in overrides.items() if v is not None})
