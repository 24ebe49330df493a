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
deliveries are unsettled; nothing is handed over between ``pause()`` and
``resume()``. A callback that raises gets its deliveries given back (nack), and
``stop()`` gives back what was gathered and not handed over, so that nothing
the broker handed out waits in a collector until the transport closes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import structlog

from meshlink.errors import ConfigurationError, MeshlinkError
from meshlink.transport.base import Delivery, Subscription

__all__ = ["BatchCallback", "BatchCollector", "BatchLimits", "CollectingSubscription"]

_log = structlog.get_logger("meshlink.transport")

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
        if not isinstance(self.max_size, int) or isinstance(self.max_size, bool):
            raise ConfigurationError("batch.max_size", f"must be a whole number, got {self.max_size!r}")
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
        self._paused = False
        self._closed = False

    async def on_delivery(self, delivery: Delivery) -> None:
        self._pending.append(delivery)
        if len(self._pending) >= self._limits.max_size or self._limits.max_wait == 0:
            await self.flush()
        elif self._timer is None:
            self._arm()

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._limits.max_wait, self._due)

    def _due(self) -> None:
        self._timer = None
        task = asyncio.get_running_loop().create_task(self.flush())
        self._timed.add(task)
        task.add_done_callback(self._timed.discard)

    async def flush(self) -> None:
        """Hand over what is gathered now (nothing if nothing is, or while paused)."""
        async with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if not self._pending or self._paused or self._closed:
                return
            batch, self._pending = self._pending, []
            try:
                await self._on_batch(batch)
            except Exception:
                # as a transport does when its per-delivery callback fails: give them back
                _log.exception("batch callback failed; messages requeued", size=len(batch))
                await _give_back(batch)

    def pause(self) -> None:
        """Hold what is gathered (nothing is handed over while the subscription is paused)."""
        self._paused = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def resume(self) -> None:
        """Hand over again: at once if a batch is full, else when the wait is over."""
        self._paused = False
        if len(self._pending) >= self._limits.max_size or (self._pending and self._limits.max_wait == 0):
            await self.flush()
        elif self._pending and self._timer is None:
            self._arm()

    async def close(self) -> None:
        """Stop for good: what is gathered and not handed over goes back to the broker."""
        async with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            batch, self._pending = self._pending, []
        await _give_back(batch)
        for task in list(self._timed):
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _give_back(deliveries: list[Delivery]) -> None:
    for delivery in deliveries:
        if delivery.settled is None:
            try:
                await delivery.nack(requeue=True)
            except MeshlinkError as exc:  # the link is gone: the broker redelivers it anyway
                _log.warning("could not give a gathered message back", error=str(exc))


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
        self.collector.pause()
        await self.inner.pause()

    async def resume(self) -> None:
        await self.inner.resume()
        await self.collector.resume()

    async def stop(self) -> None:
        try:
            await self.inner.stop()
        finally:
            await self.collector.close()

    def __getattr__(self, name: str) -> object:
        # adapter-specific attributes (a Kafka group id, a RabbitMQ queue name) stay reachable
        return getattr(self.inner, name)
