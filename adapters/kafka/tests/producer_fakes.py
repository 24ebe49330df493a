"""A stand-in for aiokafka's producer, for the broker-free producer tests.

It records the batches it is handed and lets a test decide each batch's outcome, hold a
partition back (as aiokafka does while the partition's previous batch has not gone out),
or refuse a topic's metadata.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka.errors import UnknownTopicOrPartitionError

from meshlink_kafka import KafkaSettings
from meshlink_kafka.producer import Producer, Record

__all__ = ["_Batch", "_Client", "_producer", "_record", "_settle_all", "_until"]


class _Batch:
    """Takes ``capacity`` records (an empty one takes any record), like aiokafka's BatchBuilder."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.records: list[tuple[bytes | None, bytes]] = []
        self.closed = False

    def append(self, *, timestamp: Any, key: bytes | None, value: bytes, headers: Any) -> object:
        if self.closed or (self.records and len(self.records) >= self.capacity):
            return None
        self.records.append((key, value))
        return object()

    def close(self) -> None:
        self.closed = True


class _Client:
    """Records batches in the order they are handed over; each gets a future the test settles."""

    def __init__(self, partitions: int = 1, capacity: int = 1_000) -> None:
        self.partitions = set(range(partitions))
        self.capacity = capacity
        self.batches: list[tuple[str, int, _Batch]] = []
        self.futures: list[asyncio.Future[object]] = []
        self.unknown: set[str] = set()
        self.gate = asyncio.Event()  # every partition's
        self.gate.set()
        self.held: set[int] = set()  # partitions whose previous batch has not gone out
        self.released = asyncio.Event()
        self.waiting = 0  # batches held back
        self.stopped = False

    async def partitions_for(self, topic: str) -> set[int]:
        if topic in self.unknown:
            raise UnknownTopicOrPartitionError()
        return self.partitions

    def create_batch(self) -> _Batch:
        return _Batch(self.capacity)

    async def send_batch(self, batch: _Batch, topic: str, *, partition: int) -> asyncio.Future[object]:
        await self.gate.wait()  # the partition's previous batch not gone yet: a real client waits here
        while partition in self.held:
            self.waiting += 1
            self.released.clear()
            await self.released.wait()
            self.waiting -= 1
        self.batches.append((topic, partition, batch))
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self.futures.append(fut)
        return fut

    def release(self, partition: int) -> None:
        self.held.discard(partition)
        self.released.set()

    async def stop(self) -> None:
        self.stopped = True

    @property
    def sent(self) -> list[bytes]:
        return [value for _, _, batch in self.batches for _, value in batch.records]


def _producer(client: Any, publish_timeout: float = 30.0, **settings: Any) -> Producer:
    producer = Producer(KafkaSettings(publish_timeout=publish_timeout, **settings))
    producer._producer = client  # type: ignore[assignment]
    return producer


def _record(value: bytes, key: bytes | None = None, topic: str = "t") -> Record:
    return Record(topic, key, value, [], value.decode())


async def _until(condition: Any) -> None:
    """Let the event loop run until ``condition()`` holds (progress, not time)."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


async def _settle_all(client: _Client, records: int) -> None:
    """Answer every batch (now and later) until ``records`` records were handed over."""
    while True:
        for fut in client.futures:
            if not fut.done():
                fut.set_result(None)
        if sum(len(b.records) for _, _, b in client.batches) >= records:
            return
        await asyncio.sleep(0)
