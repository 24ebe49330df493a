"""meshlink: one asyncio messaging API over RabbitMQ, Kafka and memory.

Example:
    >>> from pydantic import BaseModel
    >>> from meshlink import Context, Mesh
    >>> class OrderPlaced(BaseModel):
    ...     order_id: str
    >>> mesh = Mesh("memory://", service="billing")
    >>> @mesh.handler("orders.placed")
    ... async def charge(event: OrderPlaced, ctx: Context) -> None:
    ...     await ctx.publish("payments.captured", {"order_id": event.order_id})
"""

from meshlink._version import __version__
from meshlink.app import Mesh
from meshlink.clock import Clock, FakeClock, SystemClock
from meshlink.context import Context
from meshlink.errors import (
    AlreadySettledError,
    ConfigurationError,
    DecodeError,
    EncodeError,
    MeshlinkError,
    PublishError,
    PublishTimeoutError,
    Reject,
    RetryLater,
    TransportClosedError,
    TransportConnectionError,
    TransportError,
    UnroutableError,
)
from meshlink.events import (
    Event,
    HandlerFailed,
    Listener,
    MessageDeadLettered,
    MessageHandled,
    MessagePublished,
)
from meshlink.message import Message
from meshlink.pipeline import Handler, Middleware
from meshlink.transport import (
    Delivery,
    MemoryTransport,
    Outgoing,
    Subscription,
    SubscriptionSpec,
    Transport,
    transport_from_url,
)

__all__ = [
    "AlreadySettledError",
    "Clock",
    "ConfigurationError",
    "Context",
    "DecodeError",
    "Delivery",
    "EncodeError",
    "Event",
    "FakeClock",
    "Handler",
    "HandlerFailed",
    "Listener",
    "MemoryTransport",
    "Mesh",
    "MeshlinkError",
    "Message",
    "MessageDeadLettered",
    "MessageHandled",
    "MessagePublished",
    "Middleware",
    "Outgoing",
    "PublishError",
    "PublishTimeoutError",
    "Reject",
    "RetryLater",
    "Subscription",
    "SubscriptionSpec",
    "SystemClock",
    "Transport",
    "TransportClosedError",
    "TransportConnectionError",
    "TransportError",
    "UnroutableError",
    "__version__",
    "transport_from_url",
]
