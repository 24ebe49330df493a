"""Producing: envelope in record headers, key to partition, ``acks=all``, a deadline on every publish.

Every publish, single or many, joins one queue. A flusher task sorts what has
queued into record batches that it fills itself, one open batch per partition
(aiokafka's public ``create_batch()``/``send_batch()``), instead of a ``send()``
per record: ``send()`` costs more than the rest of a publish put together (a
coroutine, a metadata check, a size check, the pure-Python murmur2 hash of the
key and a future, for every record; ``benchmarks/kafka_throughput.py`` measures
both). Here a key's partition is hashed once per topic and partition count and
remembered, and the broker's answer to a batch settles all its publishes in one
callback. Each partition's batches are handed over by that partition's own task
(a :class:`~meshlink_kafka.batches.Lane`), because the client takes a
partition's next batch only after its previous one went out: a slow partition
holds up only its own records, and what is published meanwhile fills its next
batch.

What a publisher sees is what ``send()`` gives:

* the key picks the partition as aiokafka's default partitioner and the Java
  client do (murmur2 of the key bytes modulo the partition count), so meshlink
  and any other producer put one key on one partition. Records without a key go
  to a random partition that has a leader, the same one until its batch is full,
  so that they share batches (Kafka's "sticky" partitioning, KIP-480);
* records of one partition reach it in publish order;
* a record larger than ``max_request_size``, or one the client cannot encode,
  fails alone; a topic whose metadata cannot be had fails only its own records;
  a batch the broker refuses fails its own publishes;
* idempotent and transactional producing work unchanged: the client stamps the
  producer id and sequence numbers on a batch when it sends it;
* ``linger_ms`` applies: batches are handed over open, and the client closes them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    UnknownTopicOrPartitionError,
)
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from meshlink.deadlines import DeadlineLedger
from meshlink.errors import PublishError, PublishTimeoutError
from meshlink.message import Message
from meshlink_kafka.batches import Acked, Batch, Lane, Record, Routes, fail_unsent
from meshlink_kafka.settings import KafkaSettings

__all__ = ["Producer", "Record", "record_of"]


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


class Producer:
    """The transport's single producer: one queue, a flusher, and a lane per partition."""

    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        self._producer: AIOKafkaProducer | None = None
        self._closing = False
        self._lifecycle = asyncio.Lock()
        self._queued: list[Record] = []  # each with its ``acked`` future
        self._flusher: asyncio.Task[None] | None = None
        self._routes: dict[str, Routes] = {}
        # every single publish has the same deadline: one ledger and one timer for all of them,
        # not asyncio.timeout() per publish (a timer pushed on the loop's heap and cancelled)
        self._deadlines: DeadlineLedger[Acked] | None = None

    async def start(self) -> None:
        """Connect (raises aiokafka errors when the cluster is unreachable)."""
        async with self._lifecycle:  # after a stop() still under way, not during it
            producer = AIOKafkaProducer(**self._settings.producer_kwargs())
            try:
                await producer.start()
            except BaseException:
                await asyncio.wait_for(producer.stop(), self._settings.close_timeout)
                raise
            self._producer = producer
            self._closing = False

    async def stop(self) -> None:
        """Hand what was published to the client (within ``close_timeout``), then let the client
        flush and disconnect (within ``close_timeout`` again).

        Publishes made from now on fail at once. What cannot be handed over in time
        fails with ``PublishError`` (never sent); what the client holds but the
        broker has not answered fails as an unknown outcome. A second call waits
        for the first.
        """
        async with self._lifecycle:
            producer = self._producer
            if producer is None:
                return
            self._closing = True
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self._settings.close_timeout
            while (busy := self._busy()) and (left := deadline - loop.time()) > 0:
                await asyncio.wait(busy, timeout=left)
            busy = self._busy()
            for task in busy:
                task.cancel()
            await asyncio.gather(*busy, return_exceptions=True)
            # a task cancelled before its first step never ran its clean-up: do it here
            self._flusher = None
            fail_unsent(record.acked for record in self._queued)
            self._queued = []
            for routes in self._routes.values():
                for lane in routes.lanes.values():
                    lane.task = None
                    lane.fail_unsent()
            self._producer = None
            # brokers unreachable: unsent records are lost to us, and their publishers were told
            with contextlib.suppress(TimeoutError):  # the client's own flush: a deadline of its own
                await asyncio.wait_for(producer.stop(), self._settings.close_timeout)

    def _busy(self) -> list[asyncio.Task[None]]:
        """The flusher and the lanes still handing records over."""
        tasks = [lane.task for routes in self._routes.values() for lane in routes.lanes.values()]
        return [t for t in (self._flusher, *tasks) if t is not None and not t.done()]

    def _queue(self, record: Record, loop: asyncio.AbstractEventLoop) -> Acked:
        """Queue ``record`` for the flusher; the future gets the broker's answer."""
        if self._producer is None or self._closing:
            raise PublishError(
                "kafka producer is closed", destination=record.topic, message_id=record.message_id
            )
        acked: Acked = loop.create_future()
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
        futures: list[Acked | None] = []
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

    # -- the flusher and the lanes ----------------------------------------------------------

    async def _flush(self) -> None:
        """Sort every queued record onto its partition's lane, until the queue is empty."""
        try:
            while self._queued:
                items, self._queued = self._queued, []
                await self._sort(items)
        finally:
            self._flusher = None
            # never taken from the queue (this task was cancelled: the producer is stopping)
            fail_unsent(record.acked for record in self._queued)
            self._queued = []

    async def _sort(self, items: list[Record]) -> None:
        """Put each record on its partition's lane; start the lanes that got records."""
        topics: dict[str, Routes | BaseException] = {}  # checked once per flush
        limit = self._settings.max_request_size
        estimate = DefaultRecordBatchBuilder.estimate_size_in_bytes
        loop = asyncio.get_running_loop()
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
                try:
                    size = estimate(record.key, record.value, record.headers)
                except Exception as exc:  # this record's outcome (a body that is not bytes…)
                    acked.set_exception(exc)
                    continue
                if size > limit:
                    too_large = f"the record is {size} bytes, more than max_request_size ({limit})"
                    acked.set_exception(MessageSizeTooLargeError(too_large))
                    continue
                lane = routes.lane(routes.of(record.key, size), record.topic)
                lane.records.append(record)
                if lane.task is None:
                    lane.task = loop.create_task(self._hand_over(lane))
        except BaseException:
            # cancelled (the producer is stopping) while waiting for metadata: the records
            # from here on are on no lane (those before are the lanes' to settle)
            fail_unsent(record.acked for record in items[i:])
            raise

    async def _hand_over(self, lane: Lane) -> None:
        """Hand a lane's records to the client in batches, in order (each batch waits for the
        partition's previous one to go out)."""
        try:
            while (producer := self._producer) is not None and (batch := lane.next_batch(producer)):
                await self._submit(producer, batch)
        except Exception as exc:  # pragma: no cover - the client could not even make a batch
            lane.fail_unsent(f"kafka producer failed: {exc!r}")
        finally:
            lane.task = None
            if self._producer is None:  # stopped (or stopping): what is left is never sent
                lane.fail_unsent()

    async def _routes_of(self, producer: AIOKafkaProducer, topic: str) -> Routes | BaseException:
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
            routes = Routes(partitions, self._settings.max_batch_size)
            if topic in self._routes:  # the partition count changed: batches already filled still go
                routes.lanes = self._routes[topic].lanes
            self._routes[topic] = routes
        cluster = getattr(getattr(producer, "client", None), "cluster", None)
        available = cluster.available_partitions_for_topic(topic) if cluster is not None else None
        routes.available = sorted(available) if available else partitions
        if routes.sticky is not None and routes.sticky not in routes.available:
            routes.sticky = None
        return routes

    async def _submit(self, producer: AIOKafkaProducer, batch: Batch) -> None:
        """Hand a batch to the client (it may wait for the partition's previous batch to go out)."""
        # left open: the client closes it when it sends it, after ``linger_ms``
        try:
            fut = await producer.send_batch(batch.builder, batch.topic, partition=batch.partition)
        except asyncio.CancelledError:
            fail_unsent(batch.pending)  # the client takes a batch without suspending: not taken
            raise
        except KafkaError as exc:
            batch.fail(exc)
            return
        except Exception as exc:  # not the client's word on the batch (e.g. an assertion): ours
            batch.fail(
                PublishError(f"kafka client could not take the batch: {exc!r}", destination=batch.topic)
            )
            return
        fut.add_done_callback(batch.settle)


def _time_out(acked: Acked) -> None:
    """A publish past its deadline: unknown outcome, as under ``asyncio.timeout``."""
    if not acked.done():
        acked.set_exception(TimeoutError())


def _translate(exc: BaseException, record: Record) -> BaseException:
    """aiokafka's and asyncio's errors as meshlink's (cancellation passes through)."""
    if isinstance(exc, asyncio.CancelledError | PublishError) or not isinstance(exc, Exception):
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
    err = PublishError(f"the record cannot be sent: {exc!r}", **where)
    err.retryable = False
    return err
