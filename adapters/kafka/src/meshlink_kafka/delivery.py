"""A fetched record, the partition state it belongs to, and the Delivery handed to subscribers.

``redelivered`` on Kafka: the broker keeps no delivery count, so a consumer
records, with each commit, the highest offset it has handed out (see
:mod:`meshlink_kafka.progress`). The next owner of the partition flags every
record at or below that mark as redelivered. After a crash, records handed out
after the last commit are not flagged (the mark was never written); a nack
within one consumer is always flagged and counted.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from aiokafka import TopicPartition

from meshlink.message import Message
from meshlink.transport.base import Delivery, Settlement
from meshlink_kafka.progress import Progress
from meshlink_kafka.tracker import OffsetTracker

if TYPE_CHECKING:
    from meshlink_kafka.consumer import KafkaSubscription

__all__ = ["Item", "KafkaDelivery", "PartitionState", "Tracked", "accept", "message_of"]


class PartitionState:
    """One assigned partition of one subscription, for one assignment (an *epoch*)."""

    __slots__ = (
        "active",
        "committed",
        "draining",
        "handed_out",
        "inflight",
        "next_offset",
        "redelivered_upto",
        "skip",
        "tp",
        "tracker",
    )

    def __init__(self, tp: TopicPartition, previous: Progress) -> None:
        self.tp = tp
        self.tracker = OffsetTracker()
        self.next_offset = -1
        """Offsets below this were taken already (records repeated by the client are skipped)."""
        self.inflight = 0
        """Deliveries handed out and not settled."""
        self.handed_out = previous.handed_out
        """Highest offset handed out by this group so far (as far as we know)."""
        self.redelivered_upto = previous.handed_out
        """Records at or below this offset were handed out before: flagged redelivered."""
        self.skip = previous.done
        """Offsets a previous owner settled for good: not handed out again."""
        self.committed: tuple[int, int, int] | None = None
        """(position, handed_out, done ahead) last committed."""
        self.draining = False
        """Revocation in progress: nothing more is handed out; settlements still count."""
        self.active = True
        """False once released: settlements of its deliveries are no-ops."""


class Item:
    """A fetched record waiting for (or in) delivery (plain attributes: this is the hot path)."""

    __slots__ = ("count", "flagged", "offset", "order_key", "part", "partition_key", "record")

    def __init__(self, record: Any, part: PartitionState, flagged: bool) -> None:
        self.record = record
        self.part = part
        self.partition_key: Hashable = part.tp
        """The partition the record came from."""
        self.order_key: Hashable | None = record.key
        """The record key: order is kept per key within the partition."""
        self.offset: int = record.offset
        self.count = 0
        """Earlier deliveries of this record by this consumer (nacks)."""
        self.flagged = flagged
        """A previous owner of the partition handed this record out (count unknown)."""


class Tracked(Protocol):
    """What settlement needs of a handed-out record: an :class:`Item`, or a batch delivery
    that is its own item (:class:`~meshlink_kafka.batch_consumer.KafkaBatchDelivery`)."""

    record: Any
    part: PartitionState
    offset: int
    count: int
    flagged: bool

    @property
    def partition_key(self) -> Hashable: ...

    @property
    def order_key(self) -> Hashable | None: ...


class _Buffer(Protocol):
    def add(self, item: Item) -> None: ...


def accept(
    batches: dict[TopicPartition, list[Any]], parts: dict[TopicPartition, PartitionState], buffer: _Buffer
) -> None:
    """Fetched records into their partition's tracker and the buffer of records to hand out.

    Records of partitions not (or no longer) taken are dropped, as are records
    the client repeats; a record a previous owner settled for good is marked
    done at once and never handed out again.
    """
    for tp, records in batches.items():
        part = parts.get(tp)
        if part is None or part.draining:
            continue
        tracker = part.tracker
        upto = part.redelivered_upto
        skip = part.skip
        for rec in records:
            offset = rec.offset
            if offset < part.next_offset:
                continue
            part.next_offset = offset + 1
            tracker.add(offset)
            if skip and offset in skip:
                tracker.done(offset)  # a previous owner finished it: never run it twice
                continue
            buffer.add(Item(rec, part, offset <= upto))


def message_of(record: Any) -> Message:
    """Rebuild the envelope from a consumer record (lenient, see :meth:`Message.from_headers`)."""
    key = record.key
    value = record.value
    # from_headers takes the record's (name, bytes) pairs as they are: one pass, each decoded once
    return Message.from_headers(
        record.headers,
        value if value is not None else b"",
        key=key.decode("utf-8", errors="replace") if key is not None else None,
    )


class KafkaDelivery(Delivery):
    """A record handed to a subscription; settling it updates the partition's committable offset."""

    __slots__ = ("_item", "_sub")

    def __init__(self, sub: KafkaSubscription, item: Item) -> None:
        super().__init__(
            message_of(item.record),
            destination=sub.spec.destination,
            group=sub.spec.group,
            redelivered=item.flagged or item.count > 0,
            # the count is known unless another member handed the record out before
            delivery_count=None if item.flagged else item.count + 1,
        )
        self._sub = sub
        self._item: Tracked = item

    @property
    def location(self) -> Mapping[str, str]:
        rec = self._item.record
        return {"topic": rec.topic, "partition": str(rec.partition), "offset": str(rec.offset)}

    def ack_now(self) -> bool:
        self._claim(Settlement.ACK)
        self._sub.settle(self._item, done=True)
        return True

    async def _do_ack(self) -> None:
        self._sub.settle(self._item, done=True)

    async def _do_nack(self) -> None:
        self._sub.settle(self._item, done=False)

    async def _do_reject(self) -> None:
        self._sub.settle(self._item, done=True)
