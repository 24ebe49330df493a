"""Batches of deliveries for batch handlers, on any transport.

:meth:`Transport.subscribe_batch` hands a subscriber lists of deliveries
instead of one delivery per call. A transport that can fetch in batches
(Kafka) implements it natively; every other one gets this module's generic
version: a :class:`BatchCollector` on the per-delivery ``subscribe`` that
gathers deliveries in broker order and hands them over once ``max_size`` are
waiting, or once the oldest has waited ``max_wait`` seconds.

The guarantees are the per-delivery ones (the conformance suite checks both):
``on_batch`` is called one call at a time per subscription, in broker order;
each delivery is settled on its own, exactly once; at most ``prefetch``
deliveries are unsettled. ``stop()`` hands over what was gathered before it
returns, so that nothing handed over by the broker is left unsettled in a
collector until the transport closes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from meshlink.errors import ConfigurationError
from meshlink.transport.base import Delivery, Subscription

__all__ = ["BatchCallback", "BatchCollector", "BatchLimits", "CollectingSubscription"]

BatchCallback = Callable[[Sequence[Delivery]], Awaitable[None]]
"""Called with 1 to ``max_size`` deliveries, one call at a time per subscription, in broker order."""


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """How large a batch may grow and how long its first delivery may wait for the rest."""

    max_size: int
    """Most deliveries in one batch."""
    max_wait: float
    """Seconds the oldest gathered delivery waits for the batch to fill; 0 hands over at once."""

    def __post_init__(self) -> None:
        if self.max_size < 1:
            raise ConfigurationError("batch.max_size", f"must be >= 1, got {self.max_size}")
        if self.max_wait < 0:
            raise ConfigurationError("batch.max_wait", f"must be >= 0, got {self.max_wait}")


class BatchCollector:
    """Gathers single deliveries into batches (the per-delivery callback of a subscription)."""

    def __init__(self, on_batch: BatchCallback, limits: BatchLimits) -> None:
        self._on_batch = on_batch
        self._limits = limits
        self._pending: list[Delivery] = []
        self._timer: asyncio.TimerHandle | None = None
        # one hand-over at a time, in order, whether the size or the timer triggered it
        self._lock = asyncio.Lock()
        self._timed: set[asyncio.Task[None]] = set()

    async def on_delivery(self, delivery: Delivery) -> None:
        self._pending.append(delivery)
        if len(self._pending) >= self._limits.max_size:
            await self.flush()
        elif self._timer is None:
            if self._limits.max_wait == 0:
                await self.flush()
                return
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._limits.max_wait, self._due)

    def _due(self) -> None:
        self._timer = None
        task = asyncio.get_running_loop().create_task(self.flush())
        self._timed.add(task)
        task.add_done_callback(self._timed.discard)

    async def flush(self) -> None:
        """Hand over what is gathered now (nothing if nothing is)."""
        async with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if not self._pending:
                return
            batch, self._pending = self._pending, []
            await self._on_batch(batch)

    async def close(self) -> None:
        """Hand over what is gathered and stop the timer."""
        await self.flush()
        for task in list(self._timed):
            with contextlib.suppress(asyncio.CancelledError):
                await task


class CollectingSubscription(Subscription):
    """A per-delivery subscription whose deliveries reach the subscriber in batches."""

    def __init__(self, inner: Subscription, collector: BatchCollector) -> None:
        self.inner = inner
        self.spec = inner.spec
        self.collector = collector

    @property
    def paused(self) -> bool:
        return self.inner.paused

    async def pause(self) -> None:
        await self.inner.pause()

    async def resume(self) -> None:
        await self.inner.resume()

    async def stop(self) -> None:
        await self.inner.stop()
        await self.collector.close()

    def __getattr__(self, name: str) -> object:
        # adapter-specific attributes (a Kafka group id, a RabbitMQ queue name) stay reachable
        return getattr(self.inner, name)
