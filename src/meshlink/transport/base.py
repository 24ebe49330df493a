"""The transport contract: what every broker adapter implements.

A transport moves :class:`~meshlink.message.Message` envelopes between
*destinations* (a RabbitMQ exchange, a Kafka topic) and *groups* (a durable
queue per consumer group, a Kafka consumer group). It knows nothing about
handlers, retries or policies: those live above it and are written once.

Behaviour every transport guarantees (the conformance suite in
:mod:`meshlink.testing.conformance` checks each point on the real broker):

Task safety
    All methods are coroutine-safe within one event loop: any number of tasks may
    publish concurrently on one transport. A transport is bound to the loop it
    was connected on and is not thread-safe.

Publishing
    ``publish`` returns only once the broker has confirmed the message (RabbitMQ
    publisher confirm, Kafka ``acks=all``). ``publish_many`` pipelines: all its
    messages are in flight at once, and it returns when each is confirmed or
    raises :class:`~meshlink.errors.PublishBatchError` naming the ones that were
    not. A publish that times out raises
    :class:`~meshlink.errors.PublishTimeoutError`: outcome unknown, never "not
    sent". Messages published by one task to one destination with one key are
    delivered to each group in publish order.

Fan-out and competition
    Every group declared on a destination receives its own copy of each message
    published after the declaration. Within a group, subscriptions compete: each
    message is delivered to one of them.

Delivery and settlement
    ``subscribe`` returns once the subscription is consuming (for Kafka, once
    the group join has assigned its partitions), so a message published after
    it returns reaches the group. It calls ``on_delivery`` for one subscription one call at a time,
    in broker order; the callback should take ownership (start a task) and return
    quickly. At most ``prefetch`` deliveries of a subscription are unsettled at
    any moment. Each delivery is settled exactly once: ``ack`` (done), ``nack``
    with ``requeue=True`` (deliver again, ``redelivered`` set) or ``reject``
    (drop from this group). ``redelivered`` is exact after a nack or a close; after
    a consumer crash it is best effort where the broker cannot always tell (Kafka,
    once a partition moved to another member without its commit metadata).
    Settling twice raises
    :class:`~meshlink.errors.AlreadySettledError`. Settling a delivery whose link
    to the broker is gone is a no-op: the broker redelivers it anyway.

Pause, stop and close
    After ``pause()`` returns, ``on_delivery`` is not called again until
    ``resume()``; deliveries already handed over stay valid and may be settled.
    ``stop()`` ends the subscription the same way for good. ``close()`` stops
    every subscription; deliveries still unsettled then are returned to the
    broker for redelivery (never lost, never acked).

Delay
    ``publish(..., delay=s)`` makes the message deliverable no earlier than ``s``
    seconds after the call was made (a broker starts the delay when it takes the
    message, which may be a confirm round trip before the call returns). The broker
    holds it (TTL queue, delay topic, timer), so a delay never blocks the publisher
    or a consumer.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from meshlink.errors import AlreadySettledError, PublishBatchError
from meshlink.message import Message

if TYPE_CHECKING:
    from meshlink.transport.batching import BatchCallback, BatchLimits

__all__ = [
    "Delivery",
    "DeliveryCallback",
    "Explainable",
    "Idleable",
    "Outgoing",
    "Settlement",
    "Subscription",
    "SubscriptionSpec",
    "Transport",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Outgoing:
    """One message to publish: where, what, and an optional delay."""

    destination: str
    """The destination (exchange / topic) name."""
    message: Message
    """The envelope to send."""
    delay: float | None = None
    """Seconds before the message becomes deliverable; ``None`` for now."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SubscriptionSpec:
    """What a subscription consumes and how much it may hold at once."""

    destination: str
    """Destination to consume from."""
    group: str
    """Consumer group; subscriptions of one group compete for messages."""
    prefetch: int = 16
    """Most deliveries of this subscription that may be unsettled at once."""
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    """Transport-specific options (e.g. ``{"queue_type": "quorum"}`` on RabbitMQ)."""

    def __post_init__(self) -> None:
        if self.prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {self.prefetch}")


class Settlement:
    """How a delivery ended: the three outcomes, as constants."""

    ACK = "ack"
    NACK = "nack"
    REJECT = "reject"


class Delivery(abc.ABC):
    """One message handed to a subscription, to be settled exactly once.

    Adapters subclass this and implement the three ``_do_*`` hooks; the base
    class enforces "exactly once".
    """

    __slots__ = ("delivery_count", "destination", "group", "message", "redelivered", "settled")

    def __init__(
        self,
        message: Message,
        *,
        destination: str,
        group: str,
        redelivered: bool = False,
        delivery_count: int | None = None,
    ) -> None:
        self.message = message
        self.destination = destination
        self.group = group
        self.redelivered = redelivered
        self.delivery_count = delivery_count
        self.settled: str | None = None

    @property
    def location(self) -> Mapping[str, str]:
        """Where the broker holds this message (partition, offset…), for dead-letter headers."""
        return {}

    def wire(self) -> tuple[bytes, str, int]:
        """The body, its content type and the attempt: what a batch needs of a message that
        is handled well. An adapter that builds :attr:`message` lazily answers without
        rebuilding the whole envelope."""
        m = self.message
        return m.body, m.content_type, m.attempt

    def _claim(self, how: str) -> None:
        if self.settled is not None:
            raise AlreadySettledError(
                f"delivery already settled by {self.settled}; cannot {how}",
                message_id=self.message.id,
                destination=self.destination,
            )
        self.settled = how

    async def ack(self) -> None:
        """Mark the message done; the broker forgets it for this group."""
        self._claim(Settlement.ACK)
        await self._do_ack()

    def ack_now(self) -> bool:
        """Ack at once, when settling needs no broker round trip (Kafka records an offset,
        the memory broker forgets the message). Returns ``False``, having done nothing,
        when the caller must ``await ack()`` instead; a batch acks many this way."""
        return False

    @classmethod
    def ack_all_now(cls, deliveries: Sequence[Delivery]) -> list[Delivery]:
        """Ack at once every delivery that allows it (see :meth:`ack_now`); return the
        others, which the caller must ``await ack()``. An adapter may settle a batch of
        its own deliveries in one step here (called on the first delivery's class)."""
        return [d for d in deliveries if not d.ack_now()]

    async def nack(self, *, requeue: bool = True) -> None:
        """Give the message back: redeliver it (``requeue=True``) or drop it."""
        self._claim(Settlement.NACK if requeue else Settlement.REJECT)
        if requeue:
            await self._do_nack()
        else:
            await self._do_reject()

    async def reject(self) -> None:
        """Drop the message from this group without redelivery."""
        self._claim(Settlement.REJECT)
        await self._do_reject()

    @abc.abstractmethod
    async def _do_ack(self) -> None: ...

    @abc.abstractmethod
    async def _do_nack(self) -> None: ...

    @abc.abstractmethod
    async def _do_reject(self) -> None: ...


DeliveryCallback = Callable[[Delivery], Awaitable[None]]
"""Called once per delivery, one at a time per subscription, in broker order."""


class Subscription(abc.ABC):
    """A running consumer of one ``(destination, group)``."""

    spec: SubscriptionSpec

    @property
    @abc.abstractmethod
    def paused(self) -> bool:
        """Whether deliveries are currently held back."""

    @abc.abstractmethod
    async def pause(self) -> None:
        """Stop handing over deliveries until :meth:`resume`; keeps the group membership."""

    @abc.abstractmethod
    async def resume(self) -> None:
        """Hand over deliveries again after :meth:`pause`."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop for good; unsettled deliveries stay valid until the transport closes."""


class Transport(abc.ABC):
    """A connection to one broker. See the module docstring for the guarantees."""

    #: URL schemes this transport serves, e.g. ``("amqp", "amqps")``.
    schemes: tuple[str, ...] = ()

    @abc.abstractmethod
    async def connect(self) -> None:
        """Connect; raises :class:`~meshlink.errors.TransportConnectionError` at once if
        the broker cannot be reached. Later link losses are healed in the background."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop every subscription, return unsettled deliveries, disconnect. Idempotent."""

    @abc.abstractmethod
    async def declare(self, destination: str, group: str | None = None) -> None:
        """Make ``destination`` exist and, with ``group``, a durable group bound to it.

        A declared group keeps messages published after the declaration even while
        nothing consumes it (dead-letter destinations rely on this). Idempotent.
        """

    @abc.abstractmethod
    async def publish(self, destination: str, message: Message, *, delay: float | None = None) -> None:
        """Send one message and wait for the broker's confirmation."""

    async def publish_many(self, items: Sequence[Outgoing]) -> None:
        """Send many messages pipelined; return when all are confirmed.

        Raises:
            PublishBatchError: naming each message that was not confirmed; every
                other one was.
        """
        results = await asyncio.gather(
            *(self.publish(o.destination, o.message, delay=o.delay) for o in items),
            return_exceptions=True,
        )
        failures = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException)]
        for _, exc in failures:
            if isinstance(exc, asyncio.CancelledError):
                raise exc
        if failures:
            raise PublishBatchError(failures, len(items))

    @abc.abstractmethod
    async def subscribe(self, spec: SubscriptionSpec, on_delivery: DeliveryCallback) -> Subscription:
        """Declare ``spec.group`` on ``spec.destination`` and start consuming it."""

    async def subscribe_batch(
        self, spec: SubscriptionSpec, on_batch: BatchCallback, limits: BatchLimits
    ) -> Subscription:
        """Like :meth:`subscribe`, handing over lists of deliveries (see
        :mod:`meshlink.transport.batching`). This generic version gathers the
        per-delivery callback's deliveries; a transport that fetches in batches
        overrides it."""
        from meshlink.transport.batching import BatchCollector, CollectingSubscription

        collector = BatchCollector(on_batch, limits)
        inner = await self.subscribe(spec, collector.on_delivery)
        return CollectingSubscription(inner, collector)

    def describe(self) -> str:
        """A one-line description without credentials, for logs and ``meshlink check``."""
        return type(self).__name__


@runtime_checkable
class Explainable(Protocol):
    """Optional: a transport that can list the broker objects it declared."""

    def explain(self) -> list[dict[str, Any]]:
        """Return one dict per declared object (exchange, queue, binding, topic…)."""
        ...


@runtime_checkable
class Idleable(Protocol):
    """Optional: a transport that knows when nothing is left to deliver (``memory://``)."""

    async def wait_idle(self) -> None:
        """Return once no message is ready or unsettled in any subscribed group."""
        ...
