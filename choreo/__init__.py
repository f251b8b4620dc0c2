"""choreo: event-driven choreography over RabbitMQ.

Signed envelopes, idempotent agents, dead-letter queues and compensating events; see the
README for a quickstart and ``docs/wire-format.md`` for the envelope.
"""

from ._version import __version__ as __version__
from .agent import Agent, AgentEnv, Context, Emitted, Failure
from .config import Settings
from .envelope import Envelope
from .errors import (
    ChoreoError,
    ConfigError,
    EventExpired,
    HandlerError,
    HandlerSignal,
    HeadersNotSendable,
    MalformedMessage,
    MessageFault,
    PublishNotConfirmed,
    Reject,
    Retry,
    SchemaInvalid,
    SignatureInvalid,
    TopologyError,
    TransportError,
    UnknownEventType,
)
from .events import Event
from .publisher import Publisher
from .retry import RetryPolicy
from .runtime import AgentRuntime, AgentStats
from .signing import Keyring
from .sync import SyncPublisher
from .topology import Naming
from .worker import Worker

__all__ = [
    "Agent",
    "AgentEnv",
    "AgentRuntime",
    "AgentStats",
    "ChoreoError",
    "ConfigError",
    "Context",
    "Emitted",
    "Envelope",
    "Event",
    "EventExpired",
    "Failure",
    "HandlerError",
    "HandlerSignal",
    "HeadersNotSendable",
    "Keyring",
    "MalformedMessage",
    "MessageFault",
    "Naming",
    "PublishNotConfirmed",
    "Publisher",
    "Reject",
    "Retry",
    "RetryPolicy",
    "SchemaInvalid",
    "Settings",
    "SignatureInvalid",
    "SyncPublisher",
    "TopologyError",
    "TransportError",
    "UnknownEventType",
    "Worker",
]


def __getattr__(name: str) -> object:
    # `import choreo`, then `choreo.testing.call(...)` or `choreo.outbox.write_sqlite(...)` as the
    # docs write them, without importing either at every start-up.
    if name in {"testing", "outbox"}:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
