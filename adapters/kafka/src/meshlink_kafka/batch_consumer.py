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
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import structlog
from aiokafka import TopicPartition

from meshlink.message import Message
from meshlink.transport.base import Delivery, Settlement, SubscriptionSpec
from meshlink.transport.batching import BatchCallback, BatchLimits
from meshlink_kafka.consumer import KafkaSubscription
from meshlink_kafka.delivery import KafkaDelivery, PartitionState, Tracked, message_of
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
        self._queues: dict[Hashable, deque[KafkaBatchDelivery]] = {}
        self._busy: dict[Hashable, int] = {}
        """Records of a partition handed out and not settled."""
        self.size = 0
        """Records buffered, not counting handed-out ones."""

    def add(self, item: KafkaBatchDelivery) -> None:
        """A record was fetched (records of a partition arrive in offset order)."""
        queue = self._queues.get(item.partition_key)
        if queue is None:
            queue = self._queues[item.partition_key] = deque()
        queue.append(item)
        self.size += 1

    def extend(self, partition: Hashable, items: list[KafkaBatchDelivery]) -> None:
        """:meth:`add` for records of one partition fetched together."""
        queue = self._queues.get(partition)
        if queue is None:
            queue = self._queues[partition] = deque()
        queue.extend(items)
        self.size += len(items)

    def pop_batch(self, limit: int) -> list[KafkaBatchDelivery]:
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

    def release(self, item: Tracked, count: int = 1) -> None:
        """A handed-out record (``count`` records of its partition) was settled for good."""
        key = item.partition_key
        left = self._busy.get(key, 0) - count
        if left > 0:
            self._busy[key] = left
        else:
            self._busy.pop(key, None)

    def requeue(self, item: KafkaBatchDelivery) -> None:
        """A handed-out record was given back: a new delivery of it leads its partition's
        next batch."""
        again = item.again()
        queue = self._queues.get(again.partition_key)
        if queue is None:
            queue = self._queues[again.partition_key] = deque()
        # keep offset order among records given back from the same batch
        at = 0
        while at < len(queue) and queue[at].offset < again.offset:
            at += 1
        queue.insert(at, again)
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
    """A fetched record of a batch subscription, and its delivery: one object per hand-out
    (it is its own :class:`~meshlink_kafka.delivery.Item`, which spares an object per
    record; a record given back is handed out again as a new one, see :meth:`again`).
    Its envelope is rebuilt on first use of :attr:`message`."""

    __slots__ = ("count", "flagged", "offset", "order_key", "part", "partition_key", "record")

    def __init__(
        self, sub: KafkaSubscription, record: Any, part: PartitionState, flagged: bool, count: int = 0
    ) -> None:
        # Delivery.__init__ would take the message: set the slots without building it
        self.destination = sub.spec.destination
        self.group = sub.spec.group
        self.redelivered = flagged or count > 0
        self.delivery_count = None if flagged else count + 1
        self.settled = None
        self._sub = sub  # ``_item`` stays unset: it would be ``self``, a reference cycle
        self.record = record
        self.part = part
        self.partition_key: Hashable = part.tp
        self.order_key: Hashable | None = record.key
        self.offset: int = record.offset
        self.count = count
        """Earlier deliveries of this record by this consumer (nacks)."""
        self.flagged = flagged
        """A previous owner of the partition handed this record out (count unknown)."""

    @property
    def location(self) -> Mapping[str, str]:
        rec = self.record
        return {"topic": rec.topic, "partition": str(rec.partition), "offset": str(rec.offset)}

    def ack_now(self) -> bool:
        self._claim(Settlement.ACK)
        self._sub.settle(self, done=True)
        return True

    async def _do_ack(self) -> None:
        self._sub.settle(self, done=True)

    async def _do_nack(self) -> None:
        self._sub.settle(self, done=False)

    async def _do_reject(self) -> None:
        self._sub.settle(self, done=True)

    def again(self) -> KafkaBatchDelivery:
        """The next delivery of this record (after a nack: ``count`` was raised already)."""
        return KafkaBatchDelivery(self._sub, self.record, self.part, self.flagged, self.count)

    def __getattr__(self, name: str) -> Any:
        # only reached while the ``message`` slot is still empty
        if name == "message":
            message: Message = message_of(self.record)
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
        for d in mine:
            d.settled = Settlement.ACK
        sub.settle_acked(mine)
        return []

    def wire(self) -> tuple[bytes, str, int]:
        """Body, content type and attempt from the record, read as :meth:`Message.from_headers`
        reads them (a null header is missing; of repeated names the last counts, here even
        when it is null)."""
        record = self.record
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
        # a partition's next batch waits while the current one runs: more than a batch's
        # worth buffered only keeps records (and the collector's work) alive longer
        self._max_buffered = min(settings.max_buffered, max(limits.max_size, settings.max_poll_records))

    def _accept(self, batches: dict[TopicPartition, list[Any]]) -> None:
        """Fetched records into the trackers and the partitions' queues, a fetched run at a
        time (as :func:`~meshlink_kafka.delivery.accept` does record by record): records the
        client repeats are dropped; a record a previous owner settled for good is marked
        done and never handed out."""
        parts = self._parts
        queues = self._queues
        for tp, records in batches.items():
            part = parts.get(tp)
            if part is None or part.draining or not records:
                continue
            if records[0].offset < part.next_offset:
                records = [r for r in records if r.offset >= part.next_offset]
                if not records:
                    continue
            part.next_offset = records[-1].offset + 1
            part.tracker.add_run([r.offset for r in records])
            skip = part.skip
            if skip:
                kept = []
                for r in records:
                    if r.offset in skip:
                        part.tracker.done(r.offset)  # a previous owner finished it
                    else:
                        kept.append(r)
                records = kept
            upto = part.redelivered_upto
            queues.extend(tp, [KafkaBatchDelivery(self, r, part, r.offset <= upto) for r in records])

    def settle_acked(self, items: list[KafkaBatchDelivery]) -> None:
        """:meth:`settle` (``done``) for many items at once."""
        self._unsettled -= len(items)
        live = not self._closed
        tracked = 0
        queues = self._queues
        # a batch is one partition's: its records leave the partition's count at once
        last: KafkaBatchDelivery | None = None
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
        low_water = self._max_buffered // 2
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
            deliveries = items
            part = items[0].part
            part.inflight += len(items)
            if items[-1].offset > part.handed_out:
                part.handed_out = items[-1].offset
            self._unsettled += len(items)
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
