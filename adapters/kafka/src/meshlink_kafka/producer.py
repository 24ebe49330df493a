"""Producing: envelope in record headers, key to partition, ``acks=all``, a deadline on every publish.

Every publish, single or many, joins one queue. One flusher task hands what has
queued to the client as record batches that it fills itself, one open batch per
partition (aiokafka's public ``create_batch()``/``send_batch()``), instead of a
``send()`` per record. ``send()`` costs more than the rest of a publish put
together: a coroutine, a metadata check, a size check, the pure-Python murmur2
hash of the key and a future, for every record (``benchmarks/kafka_throughput.py``
measures both). Here a key's partition is hashed once per topic and partition
count and remembered, and the broker's answer to a batch settles all of its
publishes in one callback.

What a publisher sees is what ``send()`` gives:

* the key picks the partition as aiokafka's default partitioner and the Java
  client do (murmur2 of the key bytes modulo the partition count), so meshlink
  and any other producer put one key on one partition. Records without a key go
  to a random partition, the same one for the rest of the flush, so that they
  share a batch (Kafka's "sticky" partitioning, KIP-480);
* records of one partition reach it in publish order (one open batch per
  partition; the client sends a partition's batches in order);
* a record larger than ``max_request_size`` fails alone, with
  ``MessageSizeTooLargeError``, and a topic whose metadata cannot be had fails
  only the records for that topic; a batch the broker refuses fails its own
  publishes;
* idempotent and transactional producing work unchanged: the client stamps the
  producer id and sequence numbers on a batch when it sends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Iterable, Mapping, Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    UnknownTopicOrPartitionError,
)
from aiokafka.partitioner import murmur2
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from meshlink.deadlines import DeadlineLedger
from meshlink.errors import PublishError, PublishTimeoutError
from meshlink.message import Message
from meshlink_kafka.settings import KafkaSettings

__all__ = ["Producer", "Record", "record_of"]

Headers = list[tuple[str, bytes]]
_Acked = asyncio.Future[object]
_MAX_KEYS = 65_536
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
        self.acked: _Acked | None = None


def record_of(topic: str, message: Message, extra: Mapping[str, str] | None = None) -> Record:
    """The record that carries ``message`` to ``topic``; ``extra`` headers are added."""
    headers = message.header_pairs()
    if extra:
        # after the envelope: a repeated name counts by its last value, as in a dict
        headers += ((k, v.encode()) for k, v in extra.items())
    return Record(
        topic,
        message.key.encode() if message.key is not None else None,
        message.body,
        headers,
        message.id,
    )


class _Routes:
    """Where the records of one topic go: its partitions, and the partition of each key seen."""

    __slots__ = ("keys", "open", "partitions", "sticky")

    def __init__(self, partitions: list[int]) -> None:
        self.partitions = partitions
        self.keys: dict[bytes, int] = {}
        self.sticky: int | None = None  # this flush's partition for records without a key
        self.open: dict[int, _Batch] = {}  # this flush's batches not yet submitted, by partition

    def of(self, key: bytes | None) -> int:
        if key is None:
            if self.sticky is None:
                self.sticky = random.choice(self.partitions)
            return self.sticky
        partition = self.keys.get(key)
        if partition is None:
            if len(self.keys) >= _MAX_KEYS:
                self.keys.clear()
            # aiokafka's DefaultPartitioner (and the Java client's), remembered
            partition = self.keys[key] = self.partitions[(murmur2(key) & 0x7FFFFFFF) % len(self.partitions)]
        return partition


class _Batch:
    """An open batch for one partition and the publishes waiting on it."""

    __slots__ = ("builder", "partition", "pending", "topic")

    def __init__(self, builder: BatchBuilder, topic: str, partition: int) -> None:
        self.builder = builder
        self.topic = topic
        self.partition = partition
        self.pending: list[_Acked] = []

    def add(self, record: Record, acked: _Acked) -> bool:
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
            _pass_on(acked, fut)

    def fail(self, exc: BaseException) -> None:
        for acked in self.pending:
            if not acked.done():
                acked.set_exception(exc)


class Producer:
    """The transport's single producer: one queue and one flusher for every publish."""

    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        self._producer: AIOKafkaProducer | None = None
        self._queued: list[Record] = []  # each with its ``acked`` future
        self._flusher: asyncio.Task[None] | None = None
        self._routes: dict[str, _Routes] = {}
        # every single publish has the same deadline: one ledger and one timer for all of them,
        # not asyncio.timeout() per publish (a timer pushed on the loop's heap and cancelled)
        self._deadlines: DeadlineLedger[_Acked] | None = None

    async def start(self) -> None:
        """Connect (raises aiokafka errors when the cluster is unreachable)."""
        producer = AIOKafkaProducer(**self._settings.producer_kwargs())
        try:
            await producer.start()
        except BaseException:
            await asyncio.wait_for(producer.stop(), self._settings.close_timeout)
            raise
        self._producer = producer

    async def stop(self) -> None:
        """Flush and disconnect, bounded by ``close_timeout``."""
        if self._producer is None:
            return
        producer, self._producer = self._producer, None
        # brokers unreachable: unsent records are lost to us, and their publishers were told
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(producer.stop(), self._settings.close_timeout)

    def _queue(self, record: Record, loop: asyncio.AbstractEventLoop) -> _Acked:
        """Queue ``record`` for the flusher; the future gets the broker's answer."""
        if self._producer is None:
            raise PublishError(
                "kafka producer is closed", destination=record.topic, message_id=record.message_id
            )
        acked: _Acked = loop.create_future()
        if record.acked is not None:  # queued again (a retried publish): a new future, a new record
            record = Record(record.topic, record.key, record.value, record.headers, record.message_id)
        record.acked = acked
        self._queued.append(record)
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush())
        return acked

    async def send(self, record: Record) -> None:
        """Send one record and wait for ``acks=all``; raise a typed error otherwise."""
        loop = asyncio.get_running_loop()
        acked = self._queue(record, loop)
        deadlines = self._deadlines
        if deadlines is None or deadlines.loop() is not loop:
            deadlines = self._deadlines = DeadlineLedger(loop, self._settings.publish_timeout, _time_out)
        token = deadlines.enter(acked, loop)
        try:
            await acked
        except BaseException as exc:
            # still queued: the flusher skips it (a record handed over cannot be recalled)
            acked.cancel()
            raise _translate(exc, record) from exc
        finally:
            deadlines.leave(token)

    async def send_many(self, records: Sequence[Record]) -> list[BaseException | None]:
        """Send every record pipelined (one deadline for all); ``None`` or the error for each, in order."""
        loop = asyncio.get_running_loop()
        results: list[BaseException | None] = [None] * len(records)
        futures: list[_Acked | None] = []
        for i, record in enumerate(records):
            try:
                futures.append(self._queue(record, loop))
            except PublishError as exc:
                results[i] = exc
                futures.append(None)
        waiting = [f for f in futures if f is not None]
        if waiting:
            try:
                async with asyncio.timeout(self._settings.publish_timeout):
                    # one by one, not asyncio.wait(): a batch's answer settles many at once, and
                    # only the first unsettled one needs a wake-up (wait() schedules one per future)
                    for fut in waiting:
                        if not fut.done():
                            with contextlib.suppress(Exception):  # its outcome is read below
                                await fut
            except TimeoutError:
                pass
            finally:
                for fut in waiting:
                    fut.cancel()  # past the deadline (or our caller gave up): skipped if still queued
        for i, queued in enumerate(futures):
            if queued is None:
                continue
            error = TimeoutError() if queued.cancelled() else queued.exception()
            if error is not None:
                results[i] = _translate(error, records[i])
        return results

    # -- the flusher ----------------------------------------------------------------------

    async def _flush(self) -> None:
        """Hand every queued record to the client, in order, until the queue is empty."""
        try:
            while self._queued:
                items, self._queued = self._queued, []
                await self._hand_over(items)
        finally:
            self._flusher = None
            # never taken from the queue (this task was cancelled: the transport is closing)
            _fail_unsent(record.acked for record in self._queued)
            self._queued = []

    async def _hand_over(self, items: list[Record]) -> None:
        """Fill one batch per partition with ``items`` and submit each (a full one at once)."""
        topics: dict[str, _Routes | BaseException] = {}  # checked in this flush
        limit = self._settings.max_request_size
        estimate = DefaultRecordBatchBuilder.estimate_size_in_bytes
        i = 0
        try:
            for i, record in enumerate(items):  # noqa: B007 (read in the clean-up)
                acked = record.acked
                if acked is None or acked.done():  # its publisher gave up before it was handed over
                    continue
                producer = self._producer
                if producer is None:
                    acked.set_exception(PublishError("kafka producer is closed", destination=record.topic))
                    continue
                routes = topics.get(record.topic)
                if routes is None:
                    routes = topics[record.topic] = await self._routes_of(producer, record.topic)
                if isinstance(routes, BaseException):
                    acked.set_exception(routes)
                    continue
                size = estimate(record.key, record.value, record.headers)
                if size > limit:
                    too_large = f"the record is {size} bytes, more than max_request_size ({limit})"
                    acked.set_exception(MessageSizeTooLargeError(too_large))
                    continue
                partition = routes.of(record.key)
                batch = routes.open.get(partition)
                if batch is None:
                    batch = routes.open[partition] = _Batch(producer.create_batch(), record.topic, partition)
                if not batch.add(record, acked):
                    del routes.open[partition]
                    await self._submit(producer, batch)
                    batch = routes.open[partition] = _Batch(producer.create_batch(), record.topic, partition)
                    batch.add(record, acked)
            i = len(items)
            for routes in topics.values():
                if isinstance(routes, _Routes):
                    while routes.open:
                        await self._submit(self._producer, routes.open.pop(next(iter(routes.open))))
        except BaseException:
            # cancelled (the transport is closing) before these were handed over
            for routes in topics.values():
                if isinstance(routes, _Routes):
                    for batch in routes.open.values():
                        _fail_unsent(batch.pending)
                    routes.open.clear()
            _fail_unsent(record.acked for record in items[i:])
            raise

    async def _routes_of(self, producer: AIOKafkaProducer, topic: str) -> _Routes | BaseException:
        """The topic's routes, checked against its current partitions, or why there are none."""
        try:
            known: set[int] = await producer.partitions_for(topic)
        except KafkaError as exc:
            failed: BaseException = exc
            return failed
        partitions = sorted(known)
        if not partitions:
            empty: BaseException = UnknownTopicOrPartitionError(f"topic {topic!r} has no partitions")
            return empty
        routes = self._routes.get(topic)
        if routes is None or routes.partitions != partitions:
            routes = self._routes[topic] = _Routes(partitions)
        routes.sticky = None  # a new flush: records without a key pick a partition afresh
        routes.open = {}
        return routes

    async def _submit(self, producer: AIOKafkaProducer | None, batch: _Batch) -> None:
        """Hand a batch to the client (it may wait for the partition's previous batch to go out)."""
        if producer is None:
            batch.fail(PublishError("kafka producer is closed", destination=batch.topic))
            return
        # left open: the client closes it when it sends it, after ``linger_ms`` (nothing else
        # appends to it; an open batch lingers, a closed one would go out at once)
        try:
            fut = await producer.send_batch(batch.builder, batch.topic, partition=batch.partition)
        except asyncio.CancelledError:
            _fail_unsent(batch.pending)  # the client takes a batch without suspending: not taken
            raise
        except Exception as exc:  # this batch's outcome, not the flusher's
            batch.fail(exc)
            return
        fut.add_done_callback(batch.settle)


def _fail_unsent(waiting: Iterable[_Acked | None]) -> None:
    for acked in waiting:
        if acked is not None and not acked.done():
            acked.set_exception(PublishError("kafka producer stopped before sending"))


def _time_out(acked: _Acked) -> None:
    """A publish past its deadline: unknown outcome, as under ``asyncio.timeout``."""
    if not acked.done():
        acked.set_exception(TimeoutError())


def _pass_on(acked: _Acked, fut: asyncio.Future[object]) -> None:
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


def _translate(exc: BaseException, record: Record) -> BaseException:
    """aiokafka's and asyncio's errors as meshlink's (cancellation passes through)."""
    if isinstance(exc, asyncio.CancelledError | PublishError):
        return exc
    where = {"destination": record.topic, "message_id": record.message_id}
    if isinstance(exc, TimeoutError | KafkaTimeoutError):
        return PublishTimeoutError("no confirmation before the publish deadline; outcome unknown", **where)
    if isinstance(exc, MessageSizeTooLargeError):
        err = PublishError(f"message too large for max_request_size: {exc}", **where)
        err.retryable = False
        return err
    if isinstance(exc, KafkaError):
        return PublishError(f"kafka refused the message: {exc}", **where)
    return exc
