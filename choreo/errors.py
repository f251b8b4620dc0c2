"""The one exception tree of choreo.

    ChoreoError
    ├── ConfigError                 bad configuration (keys, URLs, agent specs)
    ├── TopologyError               broker topology differs from what an agent declares
    ├── TransportError              the broker could not be reached or refused an operation
    │   └── PublishNotConfirmed     the broker nacked, returned or never confirmed a publish
    ├── HandlerError                a handler failed for good in one delivery (after its tries)
    ├── MessageFault                a message that cannot be handled; carries a fault reason
    │   ├── SignatureInvalid        reason "signature"
    │   ├── MalformedMessage        reason "malformed"     (not a UTF-8 JSON object)
    │   ├── SchemaInvalid           reason "schema"        (envelope or payload fails validation)
    │   ├── EventExpired            reason "expired"
    │   └── UnknownEventType        reason "unknown_type"
    └── HandlerSignal               control flow raised by handlers, not errors
        ├── Retry                   transient: retry this message later
        └── Reject                  permanent: dead-letter this message now

Faults are decided before a handler runs and always dead-letter the message; signals let a
handler say what should happen to the message it is handling.
"""

from __future__ import annotations

from typing import ClassVar, Literal

FaultReason = Literal[
    "signature",
    "malformed",
    "schema",
    "expired",
    "unknown_type",
    "handler_error",
    "retries_exhausted",
]

__all__ = [
    "ChoreoError",
    "ConfigError",
    "EventExpired",
    "FaultReason",
    "HandlerError",
    "HandlerSignal",
    "MalformedMessage",
    "MessageFault",
    "PublishNotConfirmed",
    "Reject",
    "Retry",
    "SchemaInvalid",
    "SignatureInvalid",
    "TopologyError",
    "TransportError",
    "UnknownEventType",
]


class ChoreoError(Exception):
    """Root of every error choreo raises."""


class ConfigError(ChoreoError):
    """Configuration is missing or invalid; the message says which setting and why."""


class TopologyError(ChoreoError):
    """What exists on the broker differs from what an agent declares.

    ``differences`` maps each differing argument to ``(declared, existing)``.
    """

    def __init__(
        self, message: str, *, entity: str = "", differences: dict[str, tuple[object, object]] | None = None
    ) -> None:
        super().__init__(message)
        self.entity = entity
        self.differences = differences or {}


class TransportError(ChoreoError):
    """The broker could not be reached, or it refused an operation."""


class PublishNotConfirmed(TransportError):
    """The broker did not confirm a publish (nack, unroutable return, or connection lost)."""


class HeadersNotSendable(PublishNotConfirmed):
    """The message was not sent: its headers cannot go as they are. They do not fit in one AMQP
    frame (``frame_max``; the broker answers such a frame by closing the whole connection), or
    a value has no AMQP encoding (an integer past 64 bits, a string property past 255 bytes).
    Sending it again cannot help; sending it with fewer headers can."""


class HandlerError(ChoreoError):
    """A handler failed in one delivery after ``tries`` runs; ``error`` is the last exception.

    ``permanent`` says whether retrying later could help (it could not for ``Reject``, for
    exceptions declared permanent, or for exceptions outside the policy's ``retry_on``).
    """

    def __init__(self, error: BaseException, tries: int, *, permanent: bool) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error
        self.tries = tries
        self.permanent = permanent


class MessageFault(ChoreoError):
    """A message that can never be handled. Its ``reason`` goes into ``x-choreo-reason``."""

    reason: ClassVar[FaultReason]


class SignatureInvalid(MessageFault):
    reason = "signature"


class MalformedMessage(MessageFault):
    reason = "malformed"


class SchemaInvalid(MessageFault):
    reason = "schema"


class EventExpired(MessageFault):
    reason = "expired"


class UnknownEventType(MessageFault):
    reason = "unknown_type"


class HandlerSignal(ChoreoError):
    """Raised by a handler to steer what happens to the message it is handling."""


class Retry(HandlerSignal):
    """The failure is transient: the message should be tried again later."""


class Reject(HandlerSignal):
    """The failure is permanent: the message goes to the dead-letter queue now."""
