"""Broker-free behaviour of the producer's queue and the batches its flusher fills.

The client here is a stand-in that records the batches it is handed and lets the test
decide each batch's outcome: the broker paths are covered against the real broker by
the conformance suite; these are the orderings and failures a broker cannot be made to
show, and the partitioning, which must match aiokafka's own for every key.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import UnknownTopicOrPartitionError
from aiokafka.partitioner import DefaultPartitioner

from meshlink.errors import PublishError, PublishTimeoutError
from meshlink_kafka import KafkaSettings
from meshlink_kafka.producer import Producer, Record


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
        self.gate = asyncio.Event()
        self.gate.set()

    async def partitions_for(self, topic: str) -> set[int]:
        if topic in self.unknown:
            raise UnknownTopicOrPartitionError()
        return self.partitions

    def create_batch(self) -> _Batch:
        return _Batch(self.capacity)

    async def send_batch(self, batch: _Batch, topic: str, *, partition: int) -> asyncio.Future[object]:
        await self.gate.wait()  # the partition's previous batch not gone yet: a real client waits here
        self.batches.append((topic, partition, batch))
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self.futures.append(fut)
        return fut

    @property
    def sent(self) -> list[bytes]:
        return [value for _, _, batch in self.batches for _, value in batch.records]


def _producer(client: _Client, publish_timeout: float = 30.0, max_request_size: int = 1_048_576) -> Producer:
    producer = Producer(KafkaSettings(publish_timeout=publish_timeout, max_request_size=max_request_size))
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


async def test_concurrent_publishes_reach_the_client_in_call_order_and_a_batch_answer_settles_them() -> None:
    client = _Client(capacity=10)
    producer = _producer(client)
    sends = [asyncio.ensure_future(producer.send(_record(b"%d" % i))) for i in range(50)]
    await _until(lambda: len(client.futures) == 5)
    assert client.sent == [b"%d" % i for i in range(50)]
    assert [len(batch.records) for _, _, batch in client.batches] == [10] * 5
    client.futures[2].set_exception(RuntimeError("broker said no"))
    for i, fut in enumerate(client.futures):
        if i != 2:
            fut.set_result(None)
    results = await asyncio.gather(*sends, return_exceptions=True)
    assert [i for i, r in enumerate(results) if r is not None] == list(range(20, 30))


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


async def _settle_all(client: _Client, records: int) -> None:
    """Answer every batch (now and later) until ``records`` records were handed over."""
    while True:
        for fut in client.futures:
            if not fut.done():
                fut.set_result(None)
        if sum(len(b.records) for _, _, b in client.batches) >= records:
            return
        await asyncio.sleep(0)


async def test_a_record_too_large_for_a_request_fails_alone() -> None:
    client = _Client()
    producer = _producer(client, max_request_size=1_000)
    big = asyncio.ensure_future(producer.send(_record(b"x" * 2_000)))
    good = asyncio.ensure_future(producer.send(_record(b"good")))
    await _until(lambda: len(client.futures) == 1)
    client.futures[0].set_result(None)
    await good
    with pytest.raises(PublishError, match="max_request_size") as caught:
        await big
    assert caught.value.retryable is False
    assert client.sent == [b"good"]


async def test_a_topic_without_metadata_fails_only_its_own_records() -> None:
    client = _Client()
    client.unknown.add("gone")
    producer = _producer(client)
    results = await asyncio.gather(
        producer.send_many([_record(b"a", topic="gone"), _record(b"b"), _record(b"c", topic="gone")]),
        _settle_all(client, 1),
    )
    first, second, third = results[0]
    assert isinstance(first, PublishError)
    assert second is None
    assert isinstance(third, PublishError)


async def test_a_publish_that_times_out_while_queued_is_never_handed_to_the_client() -> None:
    client = _Client()
    client.gate.clear()  # the client holds the first batch: what comes next stays queued
    producer = _producer(client, publish_timeout=0.05)
    first = asyncio.ensure_future(producer.send(_record(b"first")))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    second = asyncio.ensure_future(producer.send(_record(b"second")))
    with pytest.raises(PublishTimeoutError):
        await second
    client.gate.set()
    await _until(lambda: len(client.futures) == 1)
    await asyncio.sleep(0)
    assert client.sent == [b"first"]  # the timed-out one was skipped
    with pytest.raises(PublishTimeoutError):
        await first  # its own deadline passed while the client held it


async def test_send_many_past_its_deadline_reports_every_unanswered_record_as_unknown() -> None:
    client = _Client(capacity=2)
    producer = _producer(client, publish_timeout=0.05)
    many = asyncio.ensure_future(producer.send_many([_record(b"%d" % i) for i in range(4)]))
    await _until(lambda: len(client.futures) == 2)
    client.futures[0].set_result(None)  # the first batch answered, the second never
    results = await many
    assert results[:2] == [None, None]
    assert all(isinstance(r, PublishTimeoutError) for r in results[2:])


async def test_a_batch_the_client_drops_is_an_unknown_outcome_not_a_cancel() -> None:
    client = _Client()
    producer = _producer(client)
    send = asyncio.ensure_future(producer.send(_record(b"x")))
    await _until(lambda: len(client.futures) == 1)
    client.futures[0].cancel()
    with pytest.raises(PublishTimeoutError):
        await send
    assert not send.cancelled()


async def test_records_queued_when_the_producer_stops_fail_with_a_publish_error() -> None:
    client = _Client(capacity=1)
    client.gate.clear()
    producer = _producer(client)
    sends = [asyncio.ensure_future(producer.send(_record(b"%d" % i))) for i in range(3)]
    await _until(lambda: producer._flusher is not None)
    await asyncio.sleep(0)
    producer._producer = None  # stopped: the flusher cannot hand over the rest
    client.gate.set()
    await _until(lambda: len(client.futures) == 1)
    client.futures[0].set_result(None)
    results = await asyncio.gather(*sends, return_exceptions=True)
    assert results[0] is None
    assert all(isinstance(r, PublishError) for r in results[1:])


async def test_a_flusher_cancelled_while_the_client_holds_a_batch_fails_what_it_never_handed_over() -> None:
    client = _Client(capacity=1)
    producer = _producer(client)
    first = asyncio.ensure_future(producer.send(_record(b"first")))
    await _until(lambda: len(client.futures) == 1)
    client.gate.clear()
    rest = [asyncio.ensure_future(producer.send(_record(b"%d" % i))) for i in range(3)]
    await _until(lambda: producer._flusher is not None and not producer._queued)
    flusher = producer._flusher
    assert flusher is not None
    flusher.cancel()  # what closing the transport does
    results = await asyncio.gather(*rest, return_exceptions=True)
    assert all(isinstance(r, PublishError) and "before sending" in str(r) for r in results)
    assert not first.done()  # handed over: only the broker's answer settles it
    client.futures[0].set_result(None)
    await first


async def test_answered_publishes_leave_the_deadline_queue_and_one_timer_serves_them_all() -> None:
    """The deadlines of single publishes share one timer, and answered ones are forgotten
    (a steady stream of publishes holds no more than the unanswered ones)."""
    client = _Client()
    producer = _producer(client)
    for i in range(100):
        send = asyncio.ensure_future(producer.send(_record(b"%d" % i)))
        await _until(lambda n=i + 1: len(client.futures) == n)
        client.futures[i].set_result(None)
        await send
    deadlines = producer._deadlines
    assert deadlines is not None
    assert len(deadlines) <= 1  # answered ones have left
    assert deadlines._armed  # the one timer, armed for the oldest deadline


async def test_one_unanswered_publish_does_not_make_the_deadline_queue_keep_the_answered_ones() -> None:
    client = _Client()
    producer = _producer(client)
    stuck = asyncio.ensure_future(producer.send(_record(b"stuck")))
    await _until(lambda: len(client.futures) == 1)  # never answered: stays at the front
    for i in range(10_000):
        send = asyncio.ensure_future(producer.send(_record(b"%d" % i)))
        await _until(lambda n=i + 2: len(client.futures) == n)
        client.futures[i + 1].set_result(None)
        await send
    deadlines = producer._deadlines
    assert deadlines is not None
    assert len(deadlines) <= 4_096
    assert not stuck.done()
    client.futures[0].set_result(None)
    await stuck
