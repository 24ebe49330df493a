"""Delayed delivery: delay topics, and the relay that moves due messages to their destination.

``publish(..., delay=s)`` sends the record to a *delay topic* instead of its
destination, with two extra headers: the destination and the due time (epoch
milliseconds on the publisher's clock). There is one delay topic per tier
(1 s, 5 s, 30 s, 1 min, 5 min, 30 min, 2 h, 1 day); a message goes to the
smallest tier not shorter than its delay, so a long delay never holds up a
short one for longer than the tier's width.

The relay is a member of the ``delay_group`` consumer group. Per partition it
holds the head record; when the head is due it republishes it to the
destination (``acks=all``) and commits past it, and while the head is not due
it pauses that partition until it is. A message is therefore never delivered
early (the republish adds at least one produce round trip after the due time),
and a crash between republish and commit republishes again (at-least-once).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import ConsumerStoppedError, KafkaError

from meshlink.clock import Clock
from meshlink.errors import UnroutableError
from meshlink_kafka.producer import Producer, Record
from meshlink_kafka.settings import KafkaSettings
from meshlink_kafka.topics import TopicManager

__all__ = ["H_DELAY_DUE", "H_DELAY_TARGET", "TIERS", "DelayRelay", "delay_topics", "tier_topic"]

_log = structlog.get_logger("meshlink.kafka")
H_DELAY_DUE = "x-meshlink-delay-due"
H_DELAY_TARGET = "x-meshlink-delay-target"
_DELAY_HEADERS = frozenset({H_DELAY_DUE, H_DELAY_TARGET})
#: Delay tiers in seconds.
TIERS = (1, 5, 30, 60, 300, 1800, 7200, 86400)
_MAX_WAIT_MS = 1_000
_RETRY_BACKOFF = 0.5


def tier_topic(prefix: str, delay: float) -> str:
    """The delay topic for a delay of ``delay`` seconds."""
    tier = next((t for t in TIERS if t >= delay), TIERS[-1])
    return f"{prefix}.{tier}s"


def delay_topics(prefix: str) -> list[str]:
    """Every delay topic."""
    return [f"{prefix}.{t}s" for t in TIERS]


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, relay: DelayRelay) -> None:
        self._relay = relay

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        async with self._relay._lock:  # let a forward in progress finish and commit first
            for tp in revoked:
                self._relay._heads.pop(tp, None)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        for tp in assigned:
            self._relay._heads.setdefault(tp, deque())


class DelayRelay:
    """Moves due messages from the delay topics to their destinations."""

    def __init__(
        self, settings: KafkaSettings, producer: Producer, topics: TopicManager, clock: Clock
    ) -> None:
        self._settings = settings
        self._producer = producer
        self._topics = topics
        self._clock = clock
        self._heads: dict[TopicPartition, deque[Any]] = {}
        self._lock = asyncio.Lock()
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self) -> None:
        """Create the delay topics and start relaying in the background."""
        names = delay_topics(self._settings.delay_topic_prefix)
        for name in names:
            await self._topics.ensure(name)
        self._consumer = AIOKafkaConsumer(**self._settings.consumer_kwargs(self._settings.delay_group))
        self._consumer.subscribe(names, listener=_Listener(self))
        await self._consumer.start()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="kafka-delay-relay")

    async def stop(self) -> None:
        """Stop relaying; records not yet republished stay in their delay topic."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._consumer is not None:
            with contextlib.suppress(TimeoutError, KafkaError):
                await asyncio.wait_for(self._consumer.stop(), self._settings.close_timeout)

    async def _run(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        while not self._closed:
            try:
                batches = await consumer.getmany(timeout_ms=self._wait_ms(), max_records=500)
            except ConsumerStoppedError:
                return
            except KafkaError as exc:
                _log.warning("delay relay fetch failed; retrying", error=repr(exc))
                await asyncio.sleep(_RETRY_BACKOFF)
                continue
            for tp, records in batches.items():
                queue = self._heads.get(tp)
                if queue is not None:
                    queue.extend(records)
            try:
                async with self._lock:
                    complete = await self._forward_due()
            except Exception as exc:  # e.g. a topic that cannot be ensured now: never end the relay
                _log.warning("delay relay forward failed; retrying", error=repr(exc))
                complete = False
            if not complete:
                await asyncio.sleep(_RETRY_BACKOFF)

    def _wait_ms(self) -> int:
        """Poll no longer than until the earliest buffered head is due."""
        now = self._clock.time() * 1000
        wait = float(_MAX_WAIT_MS)
        for queue in self._heads.values():
            if queue:
                wait = min(wait, max(0.0, _due(queue[0]) - now))
        return int(wait) + 1 if wait < _MAX_WAIT_MS else _MAX_WAIT_MS

    async def _forward_due(self) -> bool:
        """Republish every due head; return False if some could not be republished."""
        assert self._consumer is not None
        complete = True
        consumer = self._consumer
        assignment = consumer.assignment()
        for tp, queue in list(self._heads.items()):
            if tp not in assignment:
                continue
            now = self._clock.time() * 1000
            due: list[Any] = []
            while queue and _due(queue[0]) <= now:
                due.append(queue.popleft())
            if due:
                try:
                    forwarded = await self._republish(due)
                except BaseException:
                    queue.extendleft(reversed(due))  # none of them was sent: keep them, in order
                    consumer.pause(tp)
                    raise
                for rec in reversed(due[forwarded:]):
                    queue.appendleft(rec)  # not confirmed: try again on the next round
                complete = complete and forwarded == len(due)
                if forwarded:
                    await consumer.commit({tp: due[forwarded - 1].offset + 1})
            # the head is not due yet (or failed): stop fetching this partition until then
            if queue:
                consumer.pause(tp)
            else:
                consumer.resume(tp)
        return complete

    async def _republish(self, due: list[Any]) -> int:
        """Send the due records to their destinations; return how many leading ones are confirmed."""
        records: list[Record] = []
        for rec in due:
            headers = [(k, v) for k, v in rec.headers if k not in _DELAY_HEADERS]
            target = _header(rec, H_DELAY_TARGET)
            if not target:
                _log.error("delay record without a destination; dropped", topic=rec.topic, offset=rec.offset)
                target = ""
            else:
                try:
                    await self._topics.ensure(target)
                except UnroutableError:
                    # the topic does not exist and create_topics is off: it will not appear by
                    # itself, and retrying would hold every delayed record behind this one
                    _log.error(
                        "delayed message for a topic that does not exist; dropped",
                        destination=target,
                        topic=rec.topic,
                        offset=rec.offset,
                        message_id=_header(rec, "ce_id"),
                    )
                    target = ""
            records.append(Record(target, rec.key, rec.value or b"", headers, _header(rec, "ce_id")))
        sendable = [r for r in records if r.topic]
        results = await self._producer.send_many(sendable) if sendable else []
        outcome = iter(results)
        forwarded = 0
        for r in records:
            if r.topic and next(outcome) is not None:
                break
            forwarded += 1
        if forwarded < len(records):
            _log.warning("delay relay could not republish; will retry", destination=records[forwarded].topic)
        return forwarded


def _header(rec: Any, name: str) -> str:
    for k, v in rec.headers:
        if k == name:
            return bytes(v).decode("utf-8", errors="replace") if v is not None else ""
    return ""


def _due(rec: Any) -> float:
    try:
        return float(_header(rec, H_DELAY_DUE))
    except ValueError:
        return 0.0
