"""The transport contract, the registry of transports by URL scheme, and ``memory://``."""

from meshlink.transport.base import (
    Delivery,
    DeliveryCallback,
    Explainable,
    Idleable,
    Outgoing,
    Settlement,
    Subscription,
    SubscriptionSpec,
    Transport,
)
from meshlink.transport.memory import MemoryBroker, MemoryTransport
from meshlink.transport.registry import ENTRY_POINT_GROUP, available_schemes, transport_from_url

__all__ = [
    "Delivery",
    "DeliveryCallback",
    "ENTRY_POINT_GROUP",
    "Explainable",
    "Idleable",
    "MemoryBroker",
    "MemoryTransport",
    "Outgoing",
    "Settlement",
    "Subscription",
    "SubscriptionSpec",
    "Transport",
    "available_schemes",
    "transport_from_url",
]
