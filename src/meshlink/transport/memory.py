"""``memory://`` — the in-process transport.

A real broker that lives in the process, not a mock: it honours the whole
transport contract and passes the same conformance suite as RabbitMQ and Kafka.

* ``memory://NAME`` — every transport opened with the same ``NAME`` in one
  process shares one broker (so several :class:`~meshlink.Mesh` objects, or a
  test and a mesh, talk to each other). The broker lives as long as one of its
  transports does.
* Each declared group on a destination has its own queue (fan-out); the
  subscriptions of a group compete for it, round-robin.
* Per-key order holds across the whole group: a message with key ``K`` is not
  handed out while an earlier message with key ``K`` is unsettled, so
  different keys run concurrently and one key runs in order. A nacked message
  goes back to the head of its group queue. (A batch handler's subscription may
  take a key's following messages while it holds the key: it keeps them in order.)
* Delays run on the injected :class:`~meshlink.clock.Clock`, so tests move time
  with :class:`~meshlink.clock.FakeClock` instead of waiting.
* Every message is passed through its wire headers on publish, so whatever a
  broker transport would lose, this one loses too.
* Publishing to a destination with no declared group raises
  :class:`~meshlink.errors.UnroutableError`, as RabbitMQ does with mandatory
  publishes (add ``?unroutable=drop`` to the URL to discard instead).
"""

from __future__ import annotations

import weakref
from typing import Any
from urllib.parse import parse_qs, urlsplit

from meshlink.clock import Clock, SystemClock
from meshlink.errors import ConfigurationError, TransportClosedError, UnroutableError
from meshlink.logs import redact_url
from meshlink.message import Message
from meshlink.transport.base import (
    DeliveryCallback,
    Subscription,
    SubscriptionSpec,
    Transport,
)
from meshlink.transport.batching import BatchCallback, BatchCollector, BatchLimits, CollectingSubscription
from meshlink.transport.memory_broker import MemoryBroker, MemorySubscription

__all__ = ["MemoryBroker", "MemoryTransport"]

_BROKERS: weakref.WeakValueDictionary[str, MemoryBroker] = weakref.WeakValueDictionary()


class MemoryTransport(Transport):
    """The ``memory://`` transport. See the module docstring.

    Args:
        url: ``memory://`` or ``memory://NAME`` (optionally ``?unroutable=drop``).
        clock: time source for delayed publishes; shared by every transport of the
            same broker (the first one opened decides).
    """

    schemes = ("memory",)

    def __init__(self, url: str = "memory://", *, clock: Clock | None = None, **options: Any) -> None:
        parts = urlsplit(url)
        if parts.scheme != "memory":
            raise ConfigurationError("url", f"not a memory:// URL: {parts.scheme}://")
        if options:
            raise ConfigurationError("transport_options", f"memory:// takes no options {sorted(options)}")
        query = parse_qs(parts.query)
        unroutable = query.get("unroutable", ["error"])[0]
        if unroutable not in ("error", "drop"):
            raise ConfigurationError("url", f"unroutable must be 'error' or 'drop', got {unroutable!r}")
        self.name = parts.netloc + parts.path
        self._drop_unroutable = unroutable == "drop"
        self._clock = clock
        self._broker: MemoryBroker | None = None
        self._subs: list[MemorySubscription] = []
        self._collecting: list[CollectingSubscription] = []
        self._closed = False

    @property
    def broker(self) -> MemoryBroker:
        """The shared broker (after :meth:`connect`)."""
        if self._broker is None:
            raise TransportClosedError("memory transport is not connected")
        return self._broker

    def describe(self) -> str:
        return redact_url(f"memory://{self.name}")

    async def connect(self) -> None:
        broker = _BROKERS.get(self.name)
        if broker is None:
            broker = MemoryBroker(self.name, self._clock or SystemClock())
            _BROKERS[self.name] = broker
        self._broker = broker
        self._closed = False

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for collecting in self._collecting:  # what a collector gathered goes back first
            await collecting.collector.close()
        self._collecting.clear()
        for sub in self._subs:
            await sub.detach()
        self._subs.clear()
        self._broker = None

    def _live_broker(self) -> MemoryBroker:
        if self._closed or self._broker is None:
            raise TransportClosedError("memory transport is closed", url=self.describe())
        return self._broker

    async def declare(self, destination: str, group: str | None = None) -> None:
        self._live_broker().declare(destination, group)

    async def publish(self, destination: str, message: Message, *, delay: float | None = None) -> None:
        broker = self._live_broker()
        if not broker.check_routable(destination):
            if self._drop_unroutable:
                return
            raise UnroutableError(
                "no group is declared on this destination",
                destination=destination,
                message_id=message.id,
            )
        wire = Message.from_headers(message.to_headers(), message.body, key=message.key)
        if delay is not None and delay > 0:
            broker.schedule(destination, wire, delay)
        else:
            broker.route(destination, wire)

    async def subscribe(self, spec: SubscriptionSpec, on_delivery: DeliveryCallback) -> Subscription:
        return self._subscribe(spec, on_delivery, batching=False)

    async def subscribe_batch(
        self, spec: SubscriptionSpec, on_batch: BatchCallback, limits: BatchLimits
    ) -> Subscription:
        """The generic collector, on a subscription that may take a key's following messages
        while it holds the key (so one key's messages can fill a batch; the collector and the
        dispatcher keep them in order)."""
        collector = BatchCollector(on_batch, limits)
        collecting = CollectingSubscription(
            self._subscribe(spec, collector.on_delivery, batching=True), collector
        )
        self._collecting.append(collecting)
        return collecting

    def _subscribe(
        self, spec: SubscriptionSpec, on_delivery: DeliveryCallback, *, batching: bool
    ) -> Subscription:
        broker = self._live_broker()
        group = broker.declare(spec.destination, spec.group)
        assert group is not None
        sub = MemorySubscription(broker, group, spec, on_delivery, batching=batching)
        group.subs.append(sub)
        self._subs.append(sub)
        broker.pump(group)
        return sub

    async def wait_idle(self) -> None:
        """Wait until no consumed group of this broker has a ready or unsettled message."""
        await self._live_broker().wait_idle()

    def explain(self) -> list[dict[str, Any]]:
        """List every destination and group queue of the broker."""
        broker = self._live_broker()
        out: list[dict[str, Any]] = []
        for dest, groups in sorted(broker.destinations.items()):
            out.append({"kind": "destination", "name": dest})
            for name, g in sorted(groups.items()):
                out.append({"kind": "group", "destination": dest, "name": name, "ready": len(g.ready)})
        return out
