"""Batch subscriptions on Kafka: whole runs of one partition's fetched records per call.

:meth:`KafkaTransport.subscribe_batch` gives batch handlers what a fetch already
is: records of one partition in offset order. A :class:`KafkaBatchSubscription`
is a :class:`~meshlink_kafka.consumer.KafkaSubscription` (same group
membership, poll loop, offset tracking, batched commits, rebalance and stall
handling) whose dispatcher hands out, instead of one record at a time:

* up to ``max_size`` buffered records of one partition at once, never waiting for
  more when some are ready (``max_wait`` is a bound, and a fetch is the natural batch);
* one batch per partition at a time: a partition's next batch is handed out once
  every record of the previous one is settled, so per-key order holds across
  batches (a key lives in one partition) without per-key bookkeeping;
* batches of different partitions concurrently, up to ``prefetch`` records in all.

A record given back (nack) returns to the front of its partition's queue, in
offset order, and leads the partition's next batch.

Each delivery builds its :class:`~meshlink.message.Message` only when asked
for it; decoding a batch needs the body, the content type and the attempt, read
in one pass over the record's headers (:meth:`KafkaBatchDelivery.wire`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Hashable, Sequence
from typing import Any

import structlog
from aiokafka import TopicPartition

from meshlink.message import Message
from meshlink.transport.base import Delivery, Settlement, SubscriptionSpec
from meshlink.transport.batching import BatchCallback, BatchLimits
from meshlink_kafka.consumer import KafkaSubscription
from meshlink_kafka.delivery import Item, KafkaDelivery, accept, message_of
from meshlink_kafka.settings import KafkaSettings

__all__ = ["KafkaBatchDelivery", "KafkaBatchSubscription", "PartitionQueues"]

_log = structlog.get_logger("meshlink.kafka")
_JSON = "application/json"


class PartitionQueues:
    """Buffered records per partition, handed out a batch per partition at a time.

    Hand-written (like :class:`~meshlink_kafka.scheduler.KeyScheduler`): aiokafka
    buffers per partition but has no notion of records handed out and not settled.
    """

    __slots__ = ("_busy", "_queues", "size")

    def __init__(self) -> None:
        self._queues: dict[Hashable, deque[Item]] = {}
        self._busy: dict[Hashable, int] = {}
        """Records of a partition handed out and not settled."""
        self.size = 0
        """Records buffered, not counting handed-out ones."""

    def add(self, item: Item) -> None:
        """A record was fetched (records of a partition arrive in offset order)."""
        queue = self._queues.get(item.partition_key)
        if queue is None:
            queue = self._queues[item.partition_key] = deque()
        queue.append(item)
        self.size += 1

    def extend(self, partition: Hashable, items: list[Item]) -> None:
        """:meth:`add` for records of one partition fetched together."""
        queue = self._queues.get(partition)
        if queue is None:
            queue = self._queues[partition] = deque()
        queue.extend(items)
        self.size += len(items)

    def pop_batch(self, limit: int) -> list[Item]:
        """Up to ``limit`` records of the first partition with records and none handed out."""
        busy = self._busy
        for key, queue in self._queues.items():
            if queue and not busy.get(key):
                n = min(limit, len(queue))
                batch = [queue.popleft() for _ in range(n)]
                busy[key] = n
                self.size -= n
                # round robin: this partition goes behind the others
                del self._queues[key]
                self._queues[key] = queue
                return batch
        return []

    def release(self, item: Item, count: int = 1) -> None:
        """A handed-out record (``count`` records of its partition) was settled for good."""
        key = item.partition_key
        left = self._busy.get(key, 0) - count
        if left > 0:
            self._busy[key] = left
        else:
            self._busy.pop(key, None)

    def requeue(self, item: Item) -> None:
        """A handed-out record was given back: it leads its partition's next batch."""
        queue = self._queues.get(item.partition_key)
        if queue is None:
            queue = self._queues[item.partition_key] = deque()
        # keep offset order among records given back from the same batch
        at = 0
        while at < len(queue) and queue[at].offset < item.offset:
            at += 1
        queue.insert(at, item)
        self.size += 1
        self.release(item)

    def drop_partition(self, partition: Hashable) -> int:
        """Forget every buffered record of ``partition`` (revoked); return how many."""
        queue = self._queues.pop(partition, None)
        self._busy.pop(partition, None)
        dropped = len(queue) if queue is not None else 0
        self.size -= dropped
        return dropped

    def clear(self) -> None:
        """Forget everything (subscription stopped)."""
        self._queues.clear()
        self._busy.clear()
        self.size = 0


class KafkaBatchDelivery(KafkaDelivery):
    """A record of a batch; its envelope is rebuilt on first use of :attr:`message`."""

    __slots__ = ()

    def __init__(self, sub: KafkaSubscription, item: Item) -> None:
        # Delivery.__init__ would take the message: set the slots without building it
        self.destination = sub.spec.destination
        self.group = sub.spec.group
        self.redelivered = item.flagged or item.count > 0
        self.delivery_count = None if item.flagged else item.count + 1
        self.settled = None
        self._sub = sub
        self._item = item

    def __getattr__(self, name: str) -> Any:
        # only reached while the ``message`` slot is still empty
        if name == "message":
            message: Message = message_of(self._item.record)
            self.message = message
            return message
        raise AttributeError(name)

    @classmethod
    def ack_all_now(cls, deliveries: Sequence[Delivery]) -> list[Delivery]:
        """Settle a batch's deliveries in one step (one subscription's bookkeeping pass)."""
        if not deliveries:
            return []
        first = deliveries[0]
        sub = first._sub if isinstance(first, KafkaBatchDelivery) else None
        mine = [d for d in deliveries if isinstance(d, KafkaBatchDelivery) and d._sub is sub]
        if not isinstance(sub, KafkaBatchSubscription) or len(mine) != len(deliveries):
            return super().ack_all_now(deliveries)
        for d in mine:  # all or nothing: check every one before settling any
            if d.settled is not None:
                d._claim(Settlement.ACK)  # raises AlreadySettledError, naming the message
        items = []
        for d in mine:
            d.settled = Settlement.ACK
            items.append(d._item)
        sub.settle_acked(items)
        return []

    def wire(self) -> tuple[bytes, str, int]:
        """Body, content type and attempt from the record, read as :meth:`Message.from_headers`
        reads them (a null header is missing; of repeated names the last counts, here even
        when it is null)."""
        record = self._item.record
        content_type = None
        raw = None
        # a plain scan: cheaper than a dict of the pairs (their names are new strings, unhashed)
        for name, value in record.headers:
            if name == "content-type":
                content_type = value
            elif name == "attempt":
                raw = value
        attempt = 1
        if raw is not None:
            try:
                attempt = max(1, int(raw))
            except ValueError:
                attempt = 1
        value = record.value
        return (
            value if value is not None else b"",
            _JSON if content_type is None else content_type.decode("utf-8", "replace"),
            attempt,
        )


class KafkaBatchSubscription(KafkaSubscription):
    """A group member handing out batches (see the module docstring)."""

    def __init__(
        self, spec: SubscriptionSpec, on_batch: BatchCallback, limits: BatchLimits, settings: KafkaSettings
    ) -> None:
        super().__init__(spec, _never, settings)
        self._on_batch = on_batch
        self._limits = limits
        self._queues = PartitionQueues()
        self._sched = self._queues

    def _accept(self, batches: dict[TopicPartition, list[Any]]) -> None:
        """:func:`~meshlink_kafka.delivery.accept`, a fetched run of a partition at a time. A
        partition with offsets a previous owner finished, or a run the client repeats,
        takes the record-by-record way."""
        parts = self._parts
        queues = self._queues
        for tp, records in batches.items():
            part = parts.get(tp)
            if part is None or part.draining or not records:
                continue
            if part.skip or records[0].offset < part.next_offset:
                accept({tp: records}, parts, queues)
                continue
            part.next_offset = records[-1].offset + 1
            part.tracker.add_run([r.offset for r in records])
            upto = part.redelivered_upto
            queues.extend(tp, [Item(r, part, r.offset <= upto) for r in records])

    def settle_acked(self, items: list[Item]) -> None:
        """:meth:`settle` (``done``) for many items at once."""
        self._unsettled -= len(items)
        live = not self._closed
        tracked = 0
        queues = self._queues
        # a batch is one partition's: its records leave the partition's count at once
        last: Item | None = None
        run = 0
        for item in items:
            part = item.part
            part.inflight -= 1
            if live and part.active:
                part.tracker.done(item.offset)
                tracked += 1
                if not part.draining:
                    if last is not None and last.partition_key != item.partition_key:
                        queues.release(last, run)
                        run = 0
                    last = item
                    run += 1
        if last is not None:
            queues.release(last, run)
        if tracked:
            self._committer.settled(tracked)
            self._settled.set()
            self._wake.set()
        self._close_when_drained()

    async def _dispatch_loop(self) -> None:
        queues = self._queues
        prefetch = self.spec.prefetch
        max_size = self._limits.max_size
        low_water = self._settings.max_buffered // 2
        while True:
            room = prefetch - self._unsettled
            blocked = self._paused or self._stopped or room <= 0
            items = [] if blocked else queues.pop_batch(min(max_size, room))
            if not items:
                self._wake.clear()
                await self._wake.wait()
                continue
            if queues.size <= low_water:
                self._buffer_has_room()
            # a batch is one partition's, in offset order (given-back records lead it)
            part = items[0].part
            part.inflight += len(items)
            if items[-1].offset > part.handed_out:
                part.handed_out = items[-1].offset
            self._unsettled += len(items)
            deliveries = [KafkaBatchDelivery(self, item) for item in items]
            try:
                await self._on_batch(deliveries)
            except Exception:
                _log.exception("batch callback failed; messages requeued", size=len(deliveries))
                for delivery in deliveries:
                    if delivery.settled is None:
                        await delivery.nack(requeue=True)
            # let the batch start (and the poll loop fetch) before handing out the next one
            await asyncio.sleep(0)


async def _never(delivery: Any) -> None:  # pragma: no cover - batch subscriptions hand out batches
    raise AssertionError("a batch subscription has no per-delivery callback")
