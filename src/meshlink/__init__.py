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
from meshlink.batch import Batch, BatchContext
from meshlink.clock import Clock, FakeClock, SystemClock
from meshlink.context import Context
from meshlink.dlq import DeadLetterQueue
from meshlink.errors import (
    AlreadySettledError,
    CircuitOpenError,
    ConfigurationError,
    DecodeError,
    DuplicateInProgressError,
    EncodeError,
    HandlerTimeoutError,
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
    BreakerStateChanged,
    DuplicateSkipped,
    Event,
    HandlerFailed,
    Listener,
    MeshDraining,
    MessageDeadLettered,
    MessageGivenBack,
    MessageHandled,
    MessagePublished,
    RedeliveryScheduled,
    RetryScheduled,
)
from meshlink.message import Message
from meshlink.pipeline import Handler, Middleware
from meshlink.resilience import (
    Breaker,
    Bulkhead,
    Idempotency,
    IdempotencyStore,
    MemoryIdempotencyStore,
    Policies,
    RedisIdempotencyStore,
    Retry,
    Timeout,
)
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
    "Batch",
    "BatchContext",
    "Breaker",
    "BreakerStateChanged",
    "Bulkhead",
    "CircuitOpenError",
    "Clock",
    "ConfigurationError",
    "Context",
    "DeadLetterQueue",
    "DecodeError",
    "Delivery",
    "DuplicateInProgressError",
    "DuplicateSkipped",
    "EncodeError",
    "Event",
    "FakeClock",
    "Handler",
    "HandlerFailed",
    "HandlerTimeoutError",
    "Idempotency",
    "IdempotencyStore",
    "Listener",
    "MemoryIdempotencyStore",
    "MemoryTransport",
    "Mesh",
    "MeshDraining",
    "MeshlinkError",
    "Message",
    "MessageDeadLettered",
    "MessageGivenBack",
    "MessageHandled",
    "MessagePublished",
    "Middleware",
    "Outgoing",
    "Policies",
    "PublishError",
    "PublishTimeoutError",
    "RedeliveryScheduled",
    "RedisIdempotencyStore",
    "Reject",
    "Retry",
    "RetryLater",
    "RetryScheduled",
    "Subscription",
    "SubscriptionSpec",
    "SystemClock",
    "Timeout",
    "Transport",
    "TransportClosedError",
    "TransportConnectionError",
    "TransportError",
    "UnroutableError",
    "__version__",
    "transport_from_url",
]
