"""A stand-in for aiokafka's consumer, for the broker-free consume-side fault tests.

It models what the subscription relies on: records returned by ``getmany`` for assigned,
unpaused partitions from the consumed position on; an eager rebalance that revokes
everything, then assigns and resets positions to the committed offsets (aiokafka clears
``reassignment_in_progress`` *before* it calls ``on_partitions_assigned``, so ``getmany``
returns records of the new assignment while that callback still runs); pause/resume;
explicit commits.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import (
    IllegalStateError,
)

from meshlink.transport.base import SubscriptionSpec
from meshlink_kafka import KafkaSettings
from meshlink_kafka.consumer import KafkaSubscription

TOPIC = "orders"
TP0 = TopicPartition(TOPIC, 0)


async def _until(
    condition: Callable[[], bool], timeout: float = 5.0, what: str | Callable[[], str] = "condition"
) -> None:
    """Await ``condition()`` (checked every few milliseconds), failing after ``timeout`` seconds
    (``what`` may be a callable, to describe the state at that point)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            text = what() if callable(what) else what
            raise AssertionError(f"{text} never became true within {timeout}s")
        await asyncio.sleep(0.005)


class _Rec:
    """The fields of aiokafka's ConsumerRecord that meshlink reads."""

    def __init__(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.key = key
        self.value = value
        self.headers = headers or []
        self.timestamp = 0

    def __repr__(self) -> str:
        return f"<{self.topic}:{self.partition}@{self.offset} key={self.key!r}>"


class _Coordinator:
    """What ``previous_progress`` asks: committed offsets (with metadata), optionally held back."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.asked = 0

    async def fetch_committed_offsets(self, tps: set[TopicPartition]) -> dict[TopicPartition, Any]:
        self.asked += 1
        await self.gate.wait()  # a slow OffsetFetch (the coordinator is busy with the rebalance)
        return {}


class _FakeConsumer:
    """A stand-in for ``AIOKafkaConsumer`` (see the module doc)."""

    def __init__(self, topic: str = TOPIC, partitions: int = 1) -> None:
        self.logs: dict[TopicPartition, list[_Rec]] = {
            TopicPartition(topic, p): [] for p in range(partitions)
        }
        self.assigned: set[TopicPartition] = set()
        self.position_of: dict[TopicPartition, int] = {}
        self.committed: dict[TopicPartition, int] = {}
        self.paused_tps: set[TopicPartition] = set()
        self.listener: Any = None
        self.returned: list[_Rec] = []
        self.polls = 0
        """getmany calls answered (with records or not)."""
        self._data = asyncio.Event()
        self._coordinator = _Coordinator()
        self.stopped = False

    # -- test side
    def produce(
        self,
        tp: TopicPartition,
        key: bytes | None,
        value: bytes = b"{}",
        headers: list[tuple[str, bytes]] | None = None,
    ) -> _Rec:
        log = self.logs[tp]
        rec = _Rec(tp.topic, tp.partition, len(log), key, value, headers)
        log.append(rec)
        self._data.set()
        return rec

    async def rebalance(self, new: set[TopicPartition]) -> None:
        """An eager rebalance: revoke all, assign ``new`` (positions from the committed offsets)."""
        if self.assigned and self.listener is not None:
            await self.listener.on_partitions_revoked(set(self.assigned))
        self.assigned = set(new)
        self.paused_tps.clear()
        self.position_of = {tp: self.committed.get(tp, 0) for tp in new}
        self._data.set()  # aiokafka: reassignment_in_progress is False from here on
        if self.listener is not None:
            await self.listener.on_partitions_assigned(set(new))

    # -- aiokafka side
    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        self.stopped = True

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def pause(self, *tps: TopicPartition) -> None:
        for tp in tps:
            if tp not in self.assigned:
                raise IllegalStateError(f"not assigned: {tp}")
        self.paused_tps.update(tps)

    def resume(self, *tps: TopicPartition) -> None:
        for tp in tps:
            if tp not in self.assigned:
                raise IllegalStateError(f"not assigned: {tp}")
        self.paused_tps.difference_update(tps)
        self._data.set()

    def paused(self) -> set[TopicPartition]:
        return set(self.paused_tps)

    def _take(self, max_records: int | None) -> dict[TopicPartition, list[_Rec]]:
        out: dict[TopicPartition, list[_Rec]] = {}
        budget = max_records or 10**9
        for tp in sorted(self.assigned):
            if tp in self.paused_tps or budget <= 0:
                continue
            pos = self.position_of.get(tp, 0)
            recs = self.logs[tp][pos : pos + budget]
            if recs:
                out[tp] = recs
                budget -= len(recs)
                self.position_of[tp] = pos + len(recs)
                self.returned.extend(recs)
        return out

    async def getmany(
        self, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[_Rec]]:
        try:
            got = self._take(max_records)
            if got:
                return got
            self._data.clear()
            try:
                await asyncio.wait_for(self._data.wait(), timeout_ms / 1000)
            except TimeoutError:
                return {}
            return self._take(max_records)
        finally:
            self.polls += 1

    async def commit(self, offsets: dict[TopicPartition, Any]) -> None:
        for tp, value in offsets.items():
            if tp not in self.assigned:
                raise IllegalStateError(f"not assigned: {tp}")
            self.committed[tp] = value[0] if isinstance(value, tuple) else value

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: len(self.logs[tp]) for tp in tps}

    async def position(self, tp: TopicPartition) -> int:
        return self.position_of.get(tp, 0)


def _settings(**overrides: Any) -> KafkaSettings:
    base: dict[str, Any] = {
        # a unique "cluster" per test: the in-process progress LEDGER is keyed by it
        "bootstrap_servers": f"fake-{uuid.uuid4().hex[:8]}:9092",
        "session_timeout_ms": 1_000,
        "heartbeat_interval_ms": 300,
        "rebalance_timeout_ms": 1_000,
        "max_poll_interval_ms": 1_000,  # the poll loop holds a full buffer for 0.5 s
        "request_timeout_ms": 7_000,
        "drain_timeout": 0.5,
        "commit_interval": 0.02,
        "stall_timeout": 0,
    }
    base.update(overrides)
    return KafkaSettings(**base)


async def _subscription(
    fake: _FakeConsumer, on_delivery: Any, *, prefetch: int, **overrides: Any
) -> KafkaSubscription:
    sub = KafkaSubscription(
        SubscriptionSpec(destination=TOPIC, group="billing", prefetch=prefetch),
        on_delivery,
        _settings(**overrides),
    )
    await sub._member.client.stop()  # the real client it made (never started) is replaced
    sub._member.client = fake  # type: ignore[assignment]
    fake.listener = sub._member.listener
    return sub
