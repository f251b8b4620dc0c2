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
    HeadersTooLarge,
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
    "HeadersTooLarge",
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
