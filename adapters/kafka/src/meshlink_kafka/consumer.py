"""One subscription: a group member with a poll loop, a dispatcher and batched commits.

Three tasks per subscription:

* **poll loop** — inside ``getmany`` except while ``max_buffered`` fetched
  records wait (then aiokafka holds at most one fetch per partition), so the
  member never looks idle to the group however long handlers take; fetched
  records go to the :class:`~meshlink_kafka.scheduler.KeyScheduler` and the
  partition's :class:`~meshlink_kafka.tracker.OffsetTracker`. ``pause()``
  pauses the partitions and keeps polling (the member stays in the group).
* **dispatcher** — calls ``on_delivery`` one record at a time while fewer than
  ``prefetch`` deliveries are unsettled; a key's next record waits until the
  previous one of that key is settled, other keys go ahead.
* **committer** — every ``commit_interval`` seconds, or after ``commit_every``
  settlements, commits for each assigned partition the first offset not yet
  settled. Never a bare ``commit()`` (that would commit what was fetched).

nack(requeue) keeps the record's offset uncommitted and hands the record out
again from the consumer's own buffer, ahead of everything else and before the
next record of its key: the effect of seeking back to that one offset, without
re-fetching (and re-delivering) the records after it. If the partition moves to
another member first, the uncommitted offset is fetched there.

Revocation: stop handing out the partition's records, wait up to
``drain_timeout`` for its in-flight deliveries, commit what finished, release.
A commit refused because of a rebalance only means "will be redelivered".
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import (
    CommitFailedError,
    ConsumerStoppedError,
    IllegalGenerationError,
    IllegalStateError,
    KafkaError,
    RebalanceInProgressError,
    UnknownMemberIdError,
)

from meshlink.errors import TransportClosedError, TransportConnectionError
from meshlink.transport.base import DeliveryCallback, Subscription, SubscriptionSpec
from meshlink_kafka.delivery import Item, KafkaDelivery, PartitionState
from meshlink_kafka.progress import LEDGER, Progress, encode, previous_progress
from meshlink_kafka.scheduler import KeyScheduler
from meshlink_kafka.settings import KafkaSettings

__all__ = ["KafkaSubscription"]

_log = structlog.get_logger("meshlink.kafka")
#: Commit errors that mean the group moved on: the records will be redelivered, nothing to fix.
_REBALANCE_ERRORS = (
    CommitFailedError,
    RebalanceInProgressError,
    IllegalGenerationError,
    UnknownMemberIdError,
    IllegalStateError,
)
_POLL_MS = 1_000
_YIELD_EVERY = 64
_ERROR_BACKOFF = 0.5


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, sub: KafkaSubscription) -> None:
        self._sub = sub

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._sub._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._sub._on_assigned(assigned)


class KafkaSubscription(Subscription):
    """A running member of ``spec.group`` consuming ``spec.destination``."""

    def __init__(
        self, spec: SubscriptionSpec, on_delivery: DeliveryCallback, settings: KafkaSettings
    ) -> None:
        self.spec = spec
        self._on_delivery = on_delivery
        self._settings = settings
        self._group_id = settings.group_id(spec.destination, spec.group)
        self._consumer = AIOKafkaConsumer(**settings.consumer_kwargs(self._group_id))
        self._sched: KeyScheduler[Item] = KeyScheduler()
        self._parts: dict[TopicPartition, PartitionState] = {}
        self._unsettled = 0
        self._since_commit = 0
        self._paused = False
        self._stopped = False
        self._closed = False
        self._fetch_paused = False
        self._buffer_paused = False
        self._room = asyncio.Event()
        self._wake = asyncio.Event()
        self._settled = asyncio.Event()
        self._commit_now = asyncio.Event()
        self._assigned = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._shutdown_task: asyncio.Task[None] | None = None
        self._close_task: asyncio.Task[None] | None = None
        self._seq = itertools.count()

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Join the group; return once the first assignment arrived (possibly empty)."""
        c = self._consumer
        c.subscribe([self.spec.destination], listener=_Listener(self))
        name = f"{self.spec.destination}/{self.spec.group}"
        try:
            async with asyncio.timeout(self._settings.connect_timeout):
                await c.start()
            loop = asyncio.get_running_loop()
            self._tasks = [
                loop.create_task(self._poll_loop(), name=f"kafka-poll:{name}"),
                loop.create_task(self._dispatch_loop(), name=f"kafka-dispatch:{name}"),
                loop.create_task(self._commit_loop(), name=f"kafka-commit:{name}"),
            ]
            join = (self._settings.rebalance_timeout_ms + self._settings.request_timeout_ms) / 1000
            async with asyncio.timeout(join):
                await self._assigned.wait()
        except (TimeoutError, KafkaError) as exc:
            await self.close()
            raise TransportConnectionError(
                f"could not join the consumer group: {exc!r}",
                destination=self.spec.destination,
                group=self._group_id,
            ) from exc

    @property
    def paused(self) -> bool:
        return self._paused

    async def pause(self) -> None:
        if self._stopped:
            raise TransportClosedError("subscription is stopped", destination=self.spec.destination)
        self._paused = True
        self._apply_fetch_pause()

    async def resume(self) -> None:
        if self._stopped:
            raise TransportClosedError("subscription is stopped", destination=self.spec.destination)
        self._paused = False
        self._apply_fetch_pause()
        self._wake.set()

    async def stop(self) -> None:
        """Stop handing out; leave the group once every handed-out delivery is settled."""
        if self._stopped:
            return
        self._stopped = True
        self._sched.clear()  # fetched but never handed out: left uncommitted for the next member
        self._apply_fetch_pause()
        if self._unsettled == 0:
            await self.close()

    async def close(self) -> None:
        """Commit what finished, leave the group; unsettled deliveries stay uncommitted (redelivered)."""
        if self._close_task is None:
            self._close_task = asyncio.get_running_loop().create_task(self._close())
        await asyncio.shield(self._close_task)

    async def _close(self) -> None:
        self._stopped = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._commit(list(self._parts.values())), self._settings.close_timeout)
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        try:
            await asyncio.wait_for(self._consumer.stop(), self._settings.close_timeout)
        except (TimeoutError, KafkaError) as exc:
            _log.warning("kafka consumer did not stop cleanly", group=self._group_id, error=repr(exc))
        for part in self._parts.values():
            part.active = False
        self._parts.clear()

    # -- poll loop ---------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        c = self._consumer
        max_records = self._settings.max_poll_records
        # While the buffer is full the poll is held rather than the partitions paused: pausing
        # makes aiokafka drop what it prefetched. Only a hold longer than half the poll interval
        # pauses the partitions and polls, so that the member never looks dead to the group.
        hold = self._settings.max_poll_interval_ms / 2000
        while not self._closed:
            if self._sched.size >= self._settings.max_buffered and not self._buffer_paused:
                self._room.clear()
                try:
                    await asyncio.wait_for(self._room.wait(), hold)
                    continue
                except TimeoutError:
                    self._buffer_paused = True
                    self._apply_fetch_pause()
            try:
                batches = await c.getmany(timeout_ms=_POLL_MS, max_records=max_records)
            except ConsumerStoppedError:
                return
            except KafkaError as exc:
                # the client heals connections itself; a fetch error is retried after a pause
                _log.warning("kafka fetch failed; retrying", group=self._group_id, error=repr(exc))
                await asyncio.sleep(_ERROR_BACKOFF)
                continue
            if batches:
                self._accept(batches)

    def _accept(self, batches: dict[TopicPartition, list[Any]]) -> None:
        sched = self._sched
        for tp, records in batches.items():
            part = self._parts.get(tp)
            if part is None or part.draining or self._stopped:
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
                sched.add(Item(rec, part, offset <= upto))
        self._wake.set()

    def _apply_fetch_pause(self) -> None:
        """Pause every assigned partition while paused, stopped, or the buffer stayed full too long."""
        if self._closed:
            return
        want = self._paused or self._stopped or self._buffer_paused
        assignment = self._consumer.assignment()
        if want:
            self._consumer.pause(*assignment)
        elif self._fetch_paused:
            self._consumer.resume(*assignment)
        self._fetch_paused = want

    # -- dispatch ------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        sched = self._sched
        prefetch = self.spec.prefetch
        low_water = self._settings.max_buffered // 2
        streak = 0
        while True:
            streak += 1
            if streak % _YIELD_EVERY == 0:
                # callbacks that settle at once never suspend: let the client send its next
                # fetch (and the poll loop take it) while this buffer is still being worked off
                await asyncio.sleep(0)
            blocked = self._paused or self._stopped or self._unsettled >= prefetch
            item = None if blocked else sched.pop()
            if item is None:
                self._wake.clear()
                await self._wake.wait()
                streak = 0
                continue
            if sched.size <= low_water:
                self._room.set()
                if self._buffer_paused:
                    self._buffer_paused = False
                    self._apply_fetch_pause()
            part = item.part
            part.inflight += 1
            self._unsettled += 1
            if item.offset > part.handed_out:
                part.handed_out = item.offset
            delivery = KafkaDelivery(self, item)
            try:
                await self._on_delivery(delivery)
            except Exception:
                _log.exception("delivery callback failed; message requeued", message_id=delivery.message.id)
                if delivery.settled is None:
                    await delivery.nack(requeue=True)

    def settle(self, item: Item, *, done: bool) -> None:
        """Called by a delivery's ack / reject (``done``) or nack (not done)."""
        part = item.part
        self._unsettled -= 1
        part.inflight -= 1
        if self._closed or not part.active:
            return  # link gone: the uncommitted offset is redelivered by the broker
        if done:
            part.tracker.done(item.offset)
            if not part.draining:
                self._sched.release(item)
            self._since_commit += 1
            if self._since_commit >= self._settings.commit_every:
                self._commit_now.set()
        elif not part.draining and not self._stopped:
            item.count += 1
            self._sched.requeue(item)
        self._settled.set()
        self._wake.set()
        if self._stopped and self._unsettled == 0 and self._shutdown_task is None:
            self._shutdown_task = asyncio.get_running_loop().create_task(self.close())

    # -- commits -------------------------------------------------------------------------

    async def _commit_loop(self) -> None:
        interval = self._settings.commit_interval
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._commit_now.wait(), interval)
            self._commit_now.clear()
            await self._commit(list(self._parts.values()))

    async def _commit(self, parts: list[PartitionState]) -> None:
        """Commit each partition's settled position, with the handed-out mark as metadata."""
        async with self._commit_lock:
            if self._closed:
                return
            assignment = self._consumer.assignment()
            offsets: dict[TopicPartition, tuple[int, str]] = {}
            marks: dict[TopicPartition, tuple[int, int, int]] = {}
            for part in parts:
                pos = part.tracker.position
                if pos is None or part.tp not in assignment:
                    continue
                ahead = part.tracker.done_ahead()
                mark = (pos, part.handed_out, len(ahead))
                if mark == part.committed:
                    continue
                progress = Progress(part.handed_out, ahead)
                offsets[part.tp] = (pos, encode(pos, progress))
                marks[part.tp] = mark
                LEDGER[(self._settings.bootstrap_servers, self._group_id, part.tp)] = progress
            if not offsets:
                return
            self._since_commit = 0
            try:
                await self._consumer.commit(offsets)
            except _REBALANCE_ERRORS as exc:
                _log.info(
                    "kafka commit refused by a rebalance; records will be redelivered",
                    group=self._group_id,
                    error=repr(exc),
                )
                return
            except KafkaError as exc:
                _log.warning(
                    "kafka commit failed; retried at the next commit", group=self._group_id, error=repr(exc)
                )
                return
            for part in parts:
                if part.tp in marks:
                    part.committed = marks[part.tp]

    # -- rebalance ------------------------------------------------------------------------

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        if self._closed:
            return
        parts = [p for tp in revoked if (p := self._parts.get(tp)) is not None]
        for part in parts:
            part.draining = True
            self._sched.drop_partition(part.tp)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.drain_timeout
        while any(p.inflight for p in parts) and not self._closed:
            self._settled.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._settled.wait(), remaining)
        await self._commit(parts)
        for part in parts:
            part.active = False
            self._parts.pop(part.tp, None)
            if part.inflight:
                _log.warning(
                    "kafka partition released with unsettled deliveries; they will be redelivered",
                    partition=str(part.tp),
                    unsettled=part.inflight,
                )
        self._wake.set()

    async def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        previous = await previous_progress(
            self._consumer, self._settings.bootstrap_servers, self._group_id, assigned
        )
        for tp in assigned:
            if tp not in self._parts:
                self._parts[tp] = PartitionState(tp, previous.get(tp, Progress()))
        self._fetch_paused = bool(assigned)  # force re-application to the new assignment
        self._apply_fetch_pause()
        self._assigned.set()
        _log.debug("kafka partitions assigned", group=self._group_id, partitions=sorted(map(str, assigned)))
