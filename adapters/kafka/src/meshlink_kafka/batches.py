"""The producer's records, the batches it fills, and where each one goes.

* :class:`Record` — one record ready for the wire, and once queued the future its
  publisher waits on.
* :class:`Routes` — where a topic's records go: the partition of each key, hashed
  as aiokafka's default partitioner (and the Java client) does and remembered, and
  the "sticky" partition of records without a key.
* :class:`Lane` — one partition's batches on their way to the client, in publish
  order: the open batch being filled and the full ones waiting their turn.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Iterable
from typing import Any

from aiokafka.partitioner import murmur2
from aiokafka.producer.message_accumulator import BatchBuilder

from meshlink.errors import PublishError, PublishTimeoutError

__all__ = ["Acked", "Batch", "Headers", "Lane", "Record", "Routes", "fail_unsent"]

Headers = list[tuple[str, bytes]]
Acked = asyncio.Future[object]
MAX_KEYS = 65_536
"""Remembered key partitions per topic; past this many the memory starts afresh."""


class Record:
    """One record ready for the wire (and, once queued, the future its publisher waits on)."""

    __slots__ = ("acked", "headers", "key", "message_id", "topic", "value")

    def __init__(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers, message_id: str
    ) -> None:
        self.topic = topic
        self.key = key
        self.value = value
        self.headers = headers
        self.message_id = message_id
        self.acked: Acked | None = None


class Batch:
    """A batch for one partition and the publishes waiting on it."""

    __slots__ = ("builder", "partition", "pending", "topic")

    def __init__(self, builder: BatchBuilder, topic: str, partition: int) -> None:
        self.builder = builder
        self.topic = topic
        self.partition = partition
        self.pending: list[Acked] = []

    def add(self, record: Record, acked: Acked) -> bool:
        """Append ``record``; ``False`` when the batch is full (an empty one takes any record)."""
        appended = self.builder.append(
            timestamp=None, key=record.key, value=record.value, headers=record.headers
        )
        if appended is None:
            return False
        self.pending.append(acked)
        return True

    def settle(self, fut: asyncio.Future[object]) -> None:
        """The broker's answer for the whole batch, passed to every publish in it."""
        for acked in self.pending:
            pass_on(acked, fut)

    def fail(self, exc: BaseException) -> None:
        for acked in self.pending:
            if not acked.done():
                acked.set_exception(exc)


class Lane:
    """One partition's records on their way to the client, in publish order.

    aiokafka takes a partition's next batch only once the previous one went out
    (``send_batch`` waits until then), so every partition is handed over by its
    own task: a partition whose leader is slow or gone holds up its own records
    only. Records wait here as records and are put into a batch when their turn
    comes, so that one whose publisher gave up meanwhile (its deadline passed) is
    left out instead of sent.
    """

    __slots__ = ("partition", "records", "task", "topic")

    def __init__(self, topic: str, partition: int) -> None:
        self.topic = topic
        self.partition = partition
        self.records: deque[Record] = deque()
        self.task: asyncio.Task[None] | None = None
        """Handing this lane's records to the client (``None`` while there are none)."""

    def next_batch(self, producer: Any) -> Batch | None:
        """The next batch: the waiting records still wanted, in order, as many as fit."""
        records = self.records
        batch: Batch | None = None
        while records:
            record = records[0]
            acked = record.acked
            if acked is None or acked.done():  # its publisher gave up: never sent
                records.popleft()
                continue
            if batch is None:
                batch = Batch(producer.create_batch(), self.topic, self.partition)
            try:
                if not batch.add(record, acked):
                    break  # full: the rest go in the next batch
            except Exception as exc:  # this record's outcome (a body that is not bytes…)
                acked.set_exception(exc)
            records.popleft()
        return batch if batch is not None and batch.pending else None

    def fail_unsent(self, why: str = "kafka producer stopped before sending") -> None:
        """Fail every publish still waiting on the lane (never handed to the client)."""
        fail_unsent((record.acked for record in self.records), why)
        self.records.clear()


class Routes:
    """Where the records of one topic go: its partitions, the partition of each key seen,
    this flush's partition for records without a key, and a lane per partition."""

    __slots__ = ("available", "batch_size", "keys", "lanes", "partitions", "sticky", "sticky_bytes")

    def __init__(self, partitions: list[int], batch_size: int) -> None:
        self.partitions = partitions
        self.available = partitions
        """Partitions with a leader (records without a key go to one of these)."""
        self.batch_size = batch_size
        self.keys: dict[bytes, int] = {}
        self.sticky: int | None = None
        self.sticky_bytes = 0
        self.lanes: dict[int, Lane] = {}

    def of(self, key: bytes | None, size: int) -> int:
        """The partition of a record with ``key`` (``size`` bytes)."""
        if key is None:
            # one partition for a run of keyless records, so that they share batches
            # (Kafka's sticky partitioner, KIP-480); another once they fill a batch
            if self.sticky is None or self.sticky_bytes >= self.batch_size:
                self.sticky = random.choice(self.available)
                self.sticky_bytes = 0
            self.sticky_bytes += size
            return self.sticky
        partition = self.keys.get(key)
        if partition is None:
            if len(self.keys) >= MAX_KEYS:
                self.keys.clear()
            # aiokafka's DefaultPartitioner (and the Java client's), remembered
            partition = self.keys[key] = self.partitions[(murmur2(key) & 0x7FFFFFFF) % len(self.partitions)]
        return partition

    def lane(self, partition: int, topic: str) -> Lane:
        lane = self.lanes.get(partition)
        if lane is None:
            lane = self.lanes[partition] = Lane(topic, partition)
        return lane


def fail_unsent(waiting: Iterable[Acked | None], why: str = "kafka producer stopped before sending") -> None:
    for acked in waiting:
        if acked is not None and not acked.done():
            acked.set_exception(PublishError(why))


def pass_on(acked: Acked, fut: asyncio.Future[object]) -> None:
    """Copy the client's delivery outcome to the publisher's future (unless it gave up)."""
    if acked.done():
        if not fut.cancelled():
            fut.exception()  # retrieved: nobody waits for it any more
        return
    if fut.cancelled():  # the client dropped it (stopping): the outcome is unknown, not a cancel
        acked.set_exception(PublishTimeoutError("kafka producer stopped before the broker answered"))
    elif (exc := fut.exception()) is not None:
        acked.set_exception(exc)
    else:
        acked.set_result(None)
