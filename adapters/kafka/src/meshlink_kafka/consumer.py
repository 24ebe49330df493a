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

A fourth task, the :class:`~meshlink_kafka.watchdog.StallWatchdog`, recreates
the client when it stopped fetching while the broker holds records for it
(aiokafka #1154): every partition is released as on a revocation, the old
client stopped (bounded by ``close_timeout``), a new one joins with the same
settings, and the loops go on with it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import ConsumerStoppedError, KafkaError

from meshlink.errors import TransportClosedError, TransportConnectionError
from meshlink.transport.base import DeliveryCallback, Subscription, SubscriptionSpec
from meshlink_kafka.commits import Committer
from meshlink_kafka.delivery import Item, KafkaDelivery, PartitionState, Tracked, accept
from meshlink_kafka.member import Listener, Member
from meshlink_kafka.progress import Progress, previous_progress
from meshlink_kafka.scheduler import KeyScheduler, RecordBuffer
from meshlink_kafka.settings import KafkaSettings
from meshlink_kafka.watchdog import StallWatchdog

__all__ = ["KafkaSubscription"]

_log = structlog.get_logger("meshlink.kafka")
_POLL_MS = 1_000
_YIELD_EVERY = 64
_ERROR_BACKOFF = 0.5


class KafkaSubscription(Subscription):
    """A running member of ``spec.group`` consuming ``spec.destination``."""

    def __init__(
        self, spec: SubscriptionSpec, on_delivery: DeliveryCallback, settings: KafkaSettings
    ) -> None:
        self.spec = spec
        self._on_delivery = on_delivery
        self._settings = settings
        self._group_id = settings.group_id(spec.destination, spec.group)
        self._member = Member(settings, self._group_id, spec.destination, self)
        self._activity = 0
        self.watchdog: StallWatchdog | None = None
        """Recreates a stalled client (``None`` with ``stall_timeout=0``)."""
        if settings.stall_timeout > 0:
            self.watchdog = StallWatchdog(self, settings.stall_timeout, settings.request_timeout_ms / 1000)
        self._max_buffered = settings.max_buffered
        """Fetched records that may wait to be handed out before the poll holds."""
        self._keys: KeyScheduler[Item] = KeyScheduler()
        self._sched: RecordBuffer[Any] = self._keys
        """Fetched records not handed out (a batch subscription puts its own buffer here)."""
        self._parts: dict[TopicPartition, PartitionState] = {}
        self._unsettled = 0
        self._paused = False
        self._stopped = False
        self._closed = False
        self._fetch_paused = False
        self._buffer_paused = False
        self._room = asyncio.Event()
        self._wake = asyncio.Event()
        self._settled = asyncio.Event()
        self._assigned = asyncio.Event()
        self._committer = Committer(
            interval=settings.commit_interval,
            every=settings.commit_every,
            bootstrap=settings.bootstrap_servers,
            group_id=self._group_id,
            client=lambda: self._member.client,
            parts=self._parts.values,
            closed=lambda: self._closed,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._shutdown_task: asyncio.Task[None] | None = None
        self._close_task: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Join the group; return once the first assignment arrived (possibly empty)."""
        name = self._name
        try:
            await self._member.start()
            loop = asyncio.get_running_loop()
            self._tasks = [
                loop.create_task(self._poll_loop(), name=f"kafka-poll:{name}"),
                loop.create_task(self._dispatch_loop(), name=f"kafka-dispatch:{name}"),
                loop.create_task(self._committer.run(), name=f"kafka-commit:{name}"),
            ]
            if self.watchdog is not None:
                self._tasks.append(loop.create_task(self.watchdog.run(), name=f"kafka-watchdog:{name}"))
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
    def _name(self) -> str:
        return f"{self.spec.destination}/{self.spec.group}"

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def client(self) -> AIOKafkaConsumer:
        """The current aiokafka consumer (a new one after the watchdog recreated it)."""
        return self._member.client

    @property
    def group_id(self) -> str:
        """The Kafka consumer group id of this subscription."""
        return self._group_id

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
            await asyncio.wait_for(
                self._committer.commit(list(self._parts.values())), self._settings.close_timeout
            )
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._member.stop()
        for part in self._parts.values():
            part.active = False
        self._parts.clear()

    # -- stall recovery (driven by the watchdog) -------------------------------------------

    @property
    def activity(self) -> int:
        """Bumped by every fetch that returned records, every resume and every assignment."""
        return self._activity

    def idle_reason(self) -> str | None:
        """Why the member is not expected to fetch right now, or ``None``."""
        if self._stopped or self._closed:
            return "stopped"
        if self._paused:
            return "paused"
        if self._buffer_paused or self._sched.size >= self._max_buffered:
            return "buffer full"
        if not self._parts or not self._member.client.assignment():
            return "no partitions"
        if any(part.draining for part in self._parts.values()):
            return "rebalancing"
        return None

    def positions(self) -> dict[TopicPartition, int]:
        """Assigned partitions and the offset after the last record taken (-1: none yet)."""
        return {tp: part.next_offset for tp, part in self._parts.items()}

    async def replace_client(self) -> None:
        """Recreate the aiokafka consumer: release every partition as on a revocation (in-flight
        deliveries get ``drain_timeout``, then stay uncommitted and are redelivered), stop the old
        client (bounded), join with a new one and go on polling with it."""
        if self._stopped:
            return
        self._member.retire()  # the old client's rebalances no longer touch our state
        poll = self._tasks[0]
        poll.cancel()
        await asyncio.wait([poll])  # waits for the old loop without swallowing our own cancel
        if self._closed:
            return  # closed meanwhile: no new client
        await self._release(list(self._parts.values()))
        self._fetch_paused = self._buffer_paused = False
        if self._closed:
            return
        await self._member.replace()
        self._activity += 1
        self._room.set()
        self._tasks[0] = asyncio.get_running_loop().create_task(
            self._poll_loop(), name=f"kafka-poll:{self._name}"
        )

    # -- poll loop ---------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        c = self._member.client
        max_records = self._settings.max_poll_records
        # While the buffer is full the poll is held rather than the partitions paused: pausing
        # makes aiokafka drop what it prefetched. Only a hold longer than half the poll interval
        # pauses the partitions and polls, so that the member never looks dead to the group.
        hold = self._settings.max_poll_interval_ms / 2000
        while not self._closed:
            if self._sched.size >= self._max_buffered and not self._buffer_paused:
                self._room.clear()
                try:
                    await asyncio.wait_for(self._room.wait(), hold)
                    self._activity += 1
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
            if batches and not self._stopped:
                self._activity += 1
                self._accept(batches)
                self._wake.set()

    def _accept(self, batches: dict[TopicPartition, list[Any]]) -> None:
        """Fetched records into the trackers and the buffer (see :func:`accept`)."""
        accept(batches, self._parts, self._sched)

    def _apply_fetch_pause(self) -> None:
        """Pause every assigned partition while paused, stopped, or the buffer stayed full too long."""
        if self._closed:
            return
        want = self._paused or self._stopped or self._buffer_paused
        client = self._member.client
        assignment = client.assignment()
        if want:
            client.pause(*assignment)
        elif self._fetch_paused:
            client.resume(*assignment)
            self._activity += 1
        self._fetch_paused = want

    # -- dispatch ------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        sched = self._keys
        prefetch = self.spec.prefetch
        low_water = self._max_buffered // 2
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
                self._buffer_has_room()
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

    def _buffer_has_room(self) -> None:
        """The buffer is at most half full: end a held poll, resume a buffer pause."""
        self._room.set()
        if self._buffer_paused:
            self._buffer_paused = False
            self._apply_fetch_pause()

    def settle(self, item: Tracked, *, done: bool) -> None:
        """Called by a delivery's ack / reject (``done``) or nack (not done)."""
        part = item.part
        self._unsettled -= 1
        part.inflight -= 1
        if not self._closed and part.active:
            self._settle_live(item, done=done)
        # link gone otherwise: the uncommitted offset is redelivered by the broker
        self._close_when_drained()

    def _close_when_drained(self) -> None:
        """Once stopped, leave the group when the last handed-out delivery is settled."""
        if self._stopped and self._unsettled == 0 and self._shutdown_task is None and not self._closed:
            self._shutdown_task = asyncio.get_running_loop().create_task(self.close())

    def _settle_live(self, item: Tracked, *, done: bool) -> None:
        part = item.part
        if done:
            part.tracker.done(item.offset)
            if not part.draining:
                self._sched.release(item)
            self._committer.settled()
        elif not part.draining and not self._stopped:
            item.count += 1
            self._sched.requeue(item)
        self._settled.set()
        self._wake.set()

    # -- rebalance ------------------------------------------------------------------------

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Rebalance: release ``revoked`` (see :meth:`_release`)."""
        await self._release([p for tp in revoked if (p := self._parts.get(tp)) is not None])

    async def _release(self, parts: list[PartitionState]) -> None:
        """Stop handing out, wait up to drain_timeout for in-flight deliveries, commit, release."""
        if self._closed:
            return
        for part in parts:
            part.draining = True
            self._sched.drop_partition(part.tp)
        if self._sched.size <= self._max_buffered // 2:
            # the dropped records may have been what held the poll or paused the partitions;
            # nothing is left for the dispatch loop to take, so it would never say so
            self._buffer_has_room()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.drain_timeout
        while any(p.inflight for p in parts) and not self._closed:
            self._settled.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._settled.wait(), remaining)
        with contextlib.suppress(TimeoutError):  # the client may be the stuck one: bounded
            await asyncio.wait_for(self._committer.commit(parts), self._settings.close_timeout)
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

    async def on_assigned(self, assigned: set[TopicPartition], listener: Listener) -> None:
        """Rebalance: take ``assigned``, with what earlier owners did past the committed offsets."""
        # aiokafka makes the assignment fetchable before this callback: a record fetched
        # while we look up the progress below would find no partition state, be dropped,
        # and then be committed past. Paused, nothing is fetched until the state exists
        # (the pause is re-applied below; the client re-fetches from its position).
        self._member.client.pause(*assigned)
        previous = await previous_progress(
            self._member.client, self._settings.bootstrap_servers, self._group_id, assigned
        )
        if listener.retired or self._closed:
            return  # the client was replaced meanwhile
        self._activity += 1
        for tp in assigned:
            if tp not in self._parts:
                self._parts[tp] = PartitionState(tp, previous.get(tp, Progress()))
        self._fetch_paused = bool(assigned)  # force re-application to the new assignment
        self._apply_fetch_pause()
        self._assigned.set()
        _log.debug("kafka partitions assigned", group=self._group_id, partitions=sorted(map(str, assigned)))
