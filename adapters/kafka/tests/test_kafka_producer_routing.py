"""Broker-free behaviour of the producer's routing: where each record goes, and which
records fail alone; a slow partition on aiokafka's real accumulator.

Key partitions must match aiokafka's own default partitioner for every key.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.producer.message_accumulator import MessageAccumulator
from aiokafka.structs import TopicPartition
from producer_fakes import _Client, _producer, _record, _settle_all, _until

from meshlink.errors import PublishError
from meshlink_kafka.producer import Record


async def test_keys_go_to_the_partition_aiokafkas_default_partitioner_picks_in_publish_order() -> None:
    client = _Client(partitions=6)
    producer = _producer(client)
    keys = [b"customer-%d" % (i % 37) for i in range(300)]
    sends = [asyncio.ensure_future(producer.send(_record(b"%d" % i, key))) for i, key in enumerate(keys)]
    await _until(lambda: sum(len(b.records) for _, _, b in client.batches) == 300)
    partitions = sorted(client.partitions)

    def partition_of(key: bytes) -> int:
        return int(DefaultPartitioner()(key, partitions, partitions))

    got: dict[int, list[bytes]] = {}
    for topic, partition, batch in client.batches:
        assert topic == "t"
        for key, value in batch.records:
            assert key is not None
            assert partition == partition_of(key)
            got.setdefault(partition, []).append(value)
    for partition, values in got.items():  # each partition's records in publish order
        expected = [b"%d" % i for i, k in enumerate(keys) if partition_of(k) == partition]
        assert values == expected
    for fut in client.futures:
        fut.set_result(None)
    await asyncio.gather(*sends)


async def test_records_without_a_key_share_one_partition_per_flush() -> None:
    client = _Client(partitions=4)
    producer = _producer(client)
    await asyncio.gather(*(producer.send(_record(b"%d" % i)) for i in range(20)), _settle_all(client, 20))
    assert len(client.batches) == 1  # one flush, one partition, one batch


async def test_a_slow_partition_holds_up_only_its_own_records_on_the_real_client_accumulator() -> None:
    """aiokafka's own accumulator takes a partition's next batch only after the previous one
    went out; a partition whose batch is stuck must not keep the others' records back."""
    accumulator = MessageAccumulator(_OneNode(), 65_536, 0, 40.0, linger_ms=0)
    client = _AccumulatorClient(accumulator, partitions=2)
    producer = _producer(client, publish_timeout=30.0)
    on_0, on_1 = _key_on(0, 2), _key_on(1, 2)
    first = asyncio.ensure_future(producer.send(_record(b"a", on_0)))
    await _until(lambda: _queued_in(accumulator) == {0: 1})  # taken, never sent (no sender)
    second = asyncio.ensure_future(producer.send(_record(b"b", on_0)))  # waits for the first to go
    other = asyncio.ensure_future(producer.send(_record(b"c", on_1)))
    await _until(lambda: _queued_in(accumulator) == {0: 1, 1: 1})
    drained, _ = accumulator.drain_by_nodes(ignore_nodes=set())
    for batch in drained[0].values():
        if batch.tp.partition == 1:
            batch.done(base_offset=0)
    await _until(other.done)  # answered while partition 0 is still stuck
    await other
    assert not first.done()
    assert not second.done()
    first.cancel()
    second.cancel()


class _OneNode:
    def leader_for_partition(self, tp: TopicPartition) -> int:
        return 0


class _AccumulatorClient:
    """create_batch/send_batch as AIOKafkaProducer does them, on aiokafka's real accumulator."""

    def __init__(self, accumulator: MessageAccumulator, partitions: int) -> None:
        self.accumulator = accumulator
        self.partitions = set(range(partitions))

    async def partitions_for(self, topic: str) -> set[int]:
        return self.partitions

    def create_batch(self) -> Any:
        return self.accumulator.create_builder()

    async def send_batch(self, batch: Any, topic: str, *, partition: int) -> Any:
        return await self.accumulator.add_batch(batch, TopicPartition(topic, partition), 40.0)


def _key_on(partition: int, partitions: int) -> bytes:
    """A key that aiokafka's default partitioner puts on ``partition``."""
    i = 0
    while DefaultPartitioner()(key := b"key-%d" % i, list(range(partitions)), []) != partition:
        i += 1
    return key


def _queued_in(accumulator: MessageAccumulator) -> dict[int, int]:
    return {tp.partition: len(q) for tp, q in accumulator._batches.items() if q}


async def test_a_record_the_client_cannot_encode_fails_alone() -> None:
    client = _Client()
    producer = _producer(client)
    bad = Record("t", None, "not bytes", [], "bad")  # type: ignore[arg-type]
    results = await asyncio.gather(
        producer.send_many([_record(b"a"), bad, _record(b"c")]),
        _settle_all(client, 2),
    )
    first, second, third = results[0]
    assert first is None
    assert third is None
    assert isinstance(second, PublishError)
    assert second.retryable is False
    assert client.sent == [b"a", b"c"]


async def test_records_without_a_key_go_only_to_partitions_with_a_leader() -> None:
    client = _Client(partitions=6, capacity=5)
    client.client = _Cluster({4, 5})  # type: ignore[attr-defined]
    producer = _producer(client, max_batch_size=200)
    await asyncio.gather(*(producer.send(_record(b"x" * 50)) for _ in range(40)), _settle_all(client, 40))
    assert {partition for _, partition, _ in client.batches} <= {4, 5}


class _Cluster:
    def __init__(self, available: set[int]) -> None:
        self.cluster = self
        self.available = available

    def available_partitions_for_topic(self, topic: str) -> set[int]:
        return self.available
