"""Transports: RabbitMQ (production) and in-memory (tests, demo fallback), one seam."""

from .base import Delivery, DeliveryHandler, OutgoingMessage, Subscription, Transport
from .memory import InMemoryBroker, InMemoryTransport

__all__ = [
    "Delivery",
    "DeliveryHandler",
    "InMemoryBroker",
    "InMemoryTransport",
    "OutgoingMessage",
    "Subscription",
    "Transport",
]
