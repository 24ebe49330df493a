"""Recreate a consumer that stopped fetching while the broker holds records for it (aiokafka #1154).

After a broker restart or a rebalance an aiokafka consumer can stay a member,
with partitions assigned, and never fetch again; the client exposes no health
signal for it. The watchdog looks every ``stall_timeout`` seconds. The member
is *stalled* when, since the previous look:

* it was not idle by choice — not paused or stopped, the poll loop not holding
  because our own buffer is full, partitions assigned and none being revoked;
* nothing was fetched (no activity: fetch, resume or assignment); and
* the broker held, already at the previous look, records beyond the client's
  position on an assigned partition: every look records the end offsets
  (``end_offsets``), so a record that arrived just before a look (its fetch may
  be in flight) never makes a caught-up member look stalled. The client's
  position, not the last offset handed to us: it also moves past transaction
  markers and compacted-away records, which are never handed out but count in
  the end offset.

A stall is reported with a warning naming the group and the lagging partitions,
and the subscription recreates its client (see
:meth:`~meshlink_kafka.consumer.KafkaSubscription.replace_client`). When the
broker cannot be asked, the watchdog cannot tell and does nothing: recreating a
client does not bring a broker back. A recreation that fails is retried at the
next look.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import structlog
from aiokafka import TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError

__all__ = ["StallWatchdog", "Watched", "broker_lag"]

_log = structlog.get_logger("meshlink.kafka")
#: A client that knows a partition's position answers at once; one that does not after a whole
#: stall_timeout is stuck: it is taken to be where the subscription's last record left it.
_POSITION_WAIT = 1.0


class Watched(Protocol):
    """What the watchdog needs of a subscription."""

    @property
    def group_id(self) -> str:
        """The Kafka group id (for logs)."""
        ...

    @property
    def client(self) -> Any:
        """The current ``AIOKafkaConsumer``."""
        ...

    @property
    def activity(self) -> int:
        """A counter bumped by every fetch that returned records, every resume and assignment."""
        ...

    def idle_reason(self) -> str | None:
        """Why not fetching is expected right now (paused, stopped, buffer full, rebalancing, …)."""
        ...

    def positions(self) -> dict[TopicPartition, int]:
        """Assigned partitions and the offset after the last record taken (-1: none yet)."""
        ...

    async def replace_client(self) -> None:
        """Release the partitions, stop the client, start a new one."""
        ...


async def broker_lag(
    client: Any,
    positions: dict[TopicPartition, int],
    *,
    seen: dict[TopicPartition, int] | None = None,
) -> dict[TopicPartition, int]:
    """Records the broker holds beyond the client's position, per partition with any.

    ``positions`` (the offset after the last record taken) stand in for a client
    that does not know its position. With ``seen`` (the end offsets of an earlier
    look), only records that were already there then count: a record that arrived
    a moment ago may simply have its fetch in flight. ``seen`` is updated with the
    end offsets of this look.
    """
    tps = [tp for tp in positions if tp in client.assignment()]
    if not tps:
        return {}
    ends: dict[TopicPartition, int] = await client.end_offsets(tps)
    earlier = dict(seen) if seen is not None else None
    if seen is not None:
        seen.clear()
        seen.update(ends)
    lag: dict[TopicPartition, int] = {}
    for tp in tps:
        try:
            pos = await asyncio.wait_for(client.position(tp), _POSITION_WAIT)
        except TimeoutError:
            pos = max(positions[tp], 0)
        except (IllegalStateError, KafkaError):
            continue  # revoked meanwhile
        end = ends.get(tp, 0) if earlier is None else min(ends.get(tp, 0), earlier.get(tp, 0))
        if end > pos:
            lag[tp] = end - pos
    return lag


class StallWatchdog:
    """Looks at one subscription every ``interval`` seconds; recreates its client when stalled.

    Args:
        target: the subscription watched.
        interval: ``stall_timeout`` in seconds: a stall is acted on within two intervals.
        ask_timeout: bound on asking the broker for end offsets and positions.
    """

    def __init__(self, target: Watched, interval: float, ask_timeout: float) -> None:
        self._target = target
        self.interval = interval
        self._ask_timeout = ask_timeout
        self._baseline: int | None = None
        self._ends: dict[TopicPartition, int] = {}
        """End offsets at the previous look: a stall is records that were there a whole interval."""
        self._broken = False
        self.checks = 0
        """Looks taken so far."""
        self.recreations = 0
        """Clients recreated so far."""

    async def run(self) -> None:
        """Look every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            await self.check()

    async def check(self) -> None:
        """One look: act on a stall, or retry a recreation that failed."""
        self.checks += 1
        if self._broken:
            await self._recreate()
            return
        lag = await self.stalled()
        if not lag:
            return
        _log.warning(
            "kafka consumer stalled: the broker holds records and nothing was fetched; recreating it",
            group=self._target.group_id,
            partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in lag),
            lag=sum(lag.values()),
            stall_timeout=self.interval,
        )
        await self._recreate()

    async def stalled(self) -> dict[TopicPartition, int]:
        """The lag of a stalled member (empty: not stalled, or cannot tell)."""
        target = self._target
        if target.idle_reason() is not None:
            self._baseline = None
            self._ends.clear()
            return {}
        previous, self._baseline = self._baseline, target.activity
        # every look records the end offsets (the first eligible one too), so that the next
        # look can tell records that waited a whole interval from one that just arrived
        first = previous is None or not self._ends
        try:
            async with asyncio.timeout(self._ask_timeout):
                lag = await broker_lag(target.client, target.positions(), seen=self._ends)
        except (TimeoutError, KafkaError) as exc:
            _log.debug("kafka stall check could not ask the broker", group=target.group_id, error=repr(exc))
            self._ends.clear()
            return {}
        if first or previous != target.activity:
            return {}  # progress since the previous look (or the first eligible look)
        if target.idle_reason() is not None or target.activity != previous:
            return {}  # paused, revoked or fetched while asking
        return lag

    async def _recreate(self) -> None:
        self._baseline = None
        self._ends.clear()
        try:
            await self._target.replace_client()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._broken = True
            _log.error(
                "kafka consumer could not be recreated; retried at the next check",
                group=self._target.group_id,
                error=repr(exc),
            )
            return
        self._broken = False
        self.recreations += 1
        _log.info("kafka consumer recreated", group=self._target.group_id, recreations=self.recreations)
