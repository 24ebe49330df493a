"""Producing: envelope in record headers, key to partition, ``acks=all``, a deadline on every send.

``send_many`` pipelines: every record is handed to aiokafka's accumulator first
(so they share batches and requests), then all delivery futures are awaited
together. Both stages run under one deadline, because a send can block on
metadata or a full buffer while the broker is unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Mapping, Sequence
from functools import partial

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, KafkaTimeoutError, MessageSizeTooLargeError

from meshlink.deadlines import DeadlineLedger
from meshlink.errors import PublishError, PublishTimeoutError
from meshlink.message import Message
from meshlink_kafka.settings import KafkaSettings

__all__ = ["Producer", "Record", "record_of"]

Headers = list[tuple[str, bytes]]


class Record:
    """One record ready for the wire."""

    __slots__ = ("headers", "key", "message_id", "topic", "value")

    def __init__(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers, message_id: str
    ) -> None:
        self.topic = topic
        self.key = key
        self.value = value
        self.headers = headers
        self.message_id = message_id


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
    """The transport's single producer (aiokafka producers are coroutine-safe and batch across tasks)."""

    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        self._producer: AIOKafkaProducer | None = None
        # Hands records to the client one caller at a time. When a partition's batch is
        # full, aiokafka makes every sender wait for it to drain; a thousand concurrent
        # publishes would all wake, retry and wait again (a timer each). In line, one
        # waits and the others queue behind it, as a sequential sender would.
        self._enqueue = asyncio.Lock()
        # Single publishes are coalesced: callers queue their record and one flusher task
        # hands every queued record to the client in order (under the same lock), instead
        # of each caller taking the lock in turn (one event-loop round trip per record).
        self._queued: list[tuple[Record, asyncio.Future[object]]] = []
        self._flusher: asyncio.Task[None] | None = None
        # every single publish has the same deadline: one ledger and one timer for all of them,
        # not asyncio.timeout() per publish (a timer pushed on the loop's heap and cancelled)
        self._deadlines: DeadlineLedger[asyncio.Future[object]] | None = None

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

    def _live(self, record: Record) -> AIOKafkaProducer:
        if self._producer is None:
            raise PublishError(
                "kafka producer is closed", destination=record.topic, message_id=record.message_id
            )
        return self._producer

    async def send(self, record: Record) -> None:
        """Send one record and wait for ``acks=all``; raise a typed error otherwise."""
        self._live(record)
        loop = asyncio.get_running_loop()
        acked: asyncio.Future[object] = loop.create_future()
        self._queued.append((record, acked))
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush())
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

    async def _flush(self) -> None:
        """Hand every queued record to the client, in order; each caller awaits its own ack."""
        waiting: deque[tuple[Record, asyncio.Future[object]]] = deque()
        try:
            async with self._enqueue:
                while self._queued:
                    waiting.extend(self._queued)
                    self._queued = []
                    while waiting:
                        record, acked = waiting[0]
                        if not acked.done():  # else its caller gave up before it was handed over
                            try:
                                fut = await self._live(record).send(
                                    record.topic, record.value, key=record.key, headers=record.headers
                                )
                            except Exception as exc:  # the caller's outcome, not the flusher's
                                if not acked.done():
                                    acked.set_exception(exc)
                            else:
                                # the broker's answer goes straight to the caller (one wake-up, not two)
                                fut.add_done_callback(partial(_pass_on, acked))
                        waiting.popleft()
        finally:
            self._flusher = None
            # records never handed over (this task was cancelled: the transport is closing)
            for _, acked in (*waiting, *self._queued):
                if not acked.done():
                    acked.set_exception(PublishError("kafka producer stopped before sending"))
            self._queued = []

    async def send_many(self, records: Sequence[Record]) -> list[BaseException | None]:
        """Send every record pipelined; return ``None`` or the error for each, in order."""
        results: list[BaseException | None] = [None] * len(records)
        futures: list[tuple[int, asyncio.Future[object]]] = []
        try:
            async with asyncio.timeout(self._settings.publish_timeout):
                async with self._enqueue:
                    for i, record in enumerate(records):
                        producer = self._live(record)
                        try:
                            fut = await producer.send(
                                record.topic, record.value, key=record.key, headers=record.headers
                            )
                        except KafkaError as exc:
                            results[i] = _translate(exc, record)
                            continue
                        futures.append((i, fut))
                outcomes = await asyncio.gather(*(f for _, f in futures), return_exceptions=True)
                for (i, _), outcome in zip(futures, outcomes, strict=True):
                    if isinstance(outcome, BaseException):
                        results[i] = _translate(outcome, records[i])
        except TimeoutError:
            sent = dict(futures)
            for i, record in enumerate(records):
                fut = sent.get(i)
                confirmed = fut is not None and fut.done() and not fut.cancelled() and fut.exception() is None
                if results[i] is None and not confirmed:
                    results[i] = _translate(TimeoutError(), record)
        return results


def _time_out(acked: asyncio.Future[object]) -> None:
    """A publish past its deadline: unknown outcome, as under ``asyncio.timeout``."""
    if not acked.done():
        acked.set_exception(TimeoutError())


def _pass_on(acked: asyncio.Future[object], fut: asyncio.Future[object]) -> None:
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
