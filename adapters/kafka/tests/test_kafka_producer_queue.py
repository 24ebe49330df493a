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
from aiokafka.producer.message_accumulator import MessageAccumulator
from aiokafka.structs import TopicPartition

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
    client.held.add(0)  # the client holds the first batch: what comes next waits on the lane
    producer = _producer(client, publish_timeout=0.05)
    first = asyncio.ensure_future(producer.send(_record(b"first")))
    await _until(lambda: client.waiting == 1)
    second = asyncio.ensure_future(producer.send(_record(b"second")))
    with pytest.raises(PublishTimeoutError):
        await second
    with pytest.raises(PublishTimeoutError):
        await first  # its own deadline passed while the client held it: outcome unknown
    client.release(0)
    await _until(lambda: len(client.futures) == 1)
    third = asyncio.ensure_future(producer.send(_record(b"third")))
    await _until(lambda: len(client.futures) == 2)
    assert client.sent == [b"first", b"third"]  # the timed-out one waiting on the lane was left out
    client.futures[1].set_result(None)
    await third


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
    client.held.add(0)
    producer = _producer(client)
    sends = [asyncio.ensure_future(producer.send(_record(b"%d" % i))) for i in range(3)]
    await _until(lambda: client.waiting == 1)  # the first is being handed over, two wait on the lane
    producer._producer = None  # stopped: the lane cannot hand over the rest
    client.release(0)
    await _until(lambda: len(client.futures) == 1)
    client.futures[0].set_result(None)
    results = await asyncio.gather(*sends, return_exceptions=True)
    assert results[0] is None
    assert all(isinstance(r, PublishError) for r in results[1:])


async def test_stop_fails_what_the_client_never_took_and_leaves_the_rest_to_the_broker() -> None:
    client = _Client(capacity=1)
    producer = _producer(client, close_timeout=0.05)
    first = asyncio.ensure_future(producer.send(_record(b"first")))
    await _until(lambda: len(client.futures) == 1)
    client.held.add(0)  # the first batch never goes out: the client waits with the second
    rest = [asyncio.ensure_future(producer.send(_record(b"%d" % i))) for i in range(3)]
    await _until(lambda: client.waiting == 1)  # one of them in a batch the client holds back
    await producer.stop()
    assert client.stopped
    results = await asyncio.gather(*rest, return_exceptions=True)
    assert all(isinstance(r, PublishError) and "before sending" in str(r) for r in results)
    assert not first.done()  # handed over: only the broker's answer settles it
    client.futures[0].set_result(None)
    await first
    with pytest.raises(PublishError, match="closed"):
        await producer.send(_record(b"late"))


async def test_two_stops_at_once_are_one_and_a_restarted_producer_sends_on_every_lane() -> None:
    client = _Client()
    client.held.add(0)
    producer = _producer(client, close_timeout=1e-9)  # stop cancels whatever still runs, at once
    send = asyncio.ensure_future(producer.send(_record(b"lost")))
    await _until(lambda: any(lane.task for r in producer._routes.values() for lane in r.lanes.values()))
    await asyncio.gather(producer.stop(), producer.stop())  # the second waits for the first
    assert client.stopped
    with pytest.raises(PublishError, match="before sending"):
        await send
    # every lane is free again, whether its task was cancelled before or after its first step
    assert producer._flusher is None
    assert all(lane.task is None for r in producer._routes.values() for lane in r.lanes.values())
    client.release(0)
    producer._producer = client  # what start() does with a new client
    producer._closing = False
    await asyncio.gather(producer.send(_record(b"after")), _settle_all(client, 1))
    assert client.sent == [b"after"]


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
