"""Broker-free checks of the batch subscription's pieces: the per-partition queues, the
tracker's run of offsets, a batch delivery's lazy envelope and its one-step ack."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import TopicPartition

from meshlink import Message
from meshlink.errors import AlreadySettledError
from meshlink.transport.base import SubscriptionSpec
from meshlink.transport.batching import BatchLimits
from meshlink_kafka import KafkaSettings
from meshlink_kafka.batch_consumer import KafkaBatchDelivery, KafkaBatchSubscription, PartitionQueues
from meshlink_kafka.delivery import PartitionState
from meshlink_kafka.progress import Progress
from meshlink_kafka.tracker import OffsetTracker

TP0 = TopicPartition("t", 0)
TP1 = TopicPartition("t", 1)


class Rec:
    def __init__(self, offset: int, headers: list[tuple[str, Any]], key: bytes | None = b"k") -> None:
        self.topic, self.partition, self.offset = "t", 0, offset
        self.key, self.value, self.headers = key, b'{"n": 1}', headers


def items(sub: KafkaBatchSubscription, part: PartitionState, offsets: range) -> list[KafkaBatchDelivery]:
    return [KafkaBatchDelivery(sub, Rec(o, []), part, False) for o in offsets]


async def test_queues_hand_out_one_batch_per_partition_until_it_is_settled(
    sub: KafkaBatchSubscription,
) -> None:
    q = PartitionQueues()
    p0, p1 = PartitionState(TP0, Progress()), PartitionState(TP1, Progress())
    q.extend(TP0, items(sub, p0, range(0, 5)))
    q.extend(TP1, items(sub, p1, range(0, 2)))
    first = q.pop_batch(3)
    assert [i.offset for i in first] == [0, 1, 2]
    assert first[0].part is p0
    second = q.pop_batch(3)
    assert second[0].part is p1, "the busy partition is skipped"
    assert q.pop_batch(3) == [], "both partitions have a batch out"
    for i in first[:2]:
        q.release(i)
    q.requeue(first[2])  # given back: leads the partition's next batch
    third = q.pop_batch(10)
    assert [i.offset for i in third] == [2, 3, 4]
    assert third[0] is not first[2], "a new delivery of the record"
    assert third[0].settled is None
    assert q.size == 0


async def test_given_back_records_keep_offset_order(sub: KafkaBatchSubscription) -> None:
    q = PartitionQueues()
    p0 = PartitionState(TP0, Progress())
    q.extend(TP0, items(sub, p0, range(0, 6)))
    batch = q.pop_batch(4)
    for i in reversed(batch):  # given back in any order
        q.requeue(i)
    assert [i.offset for i in q.pop_batch(10)] == [0, 1, 2, 3, 4, 5]


async def test_dropping_a_partition_forgets_its_records_and_its_batch(sub: KafkaBatchSubscription) -> None:
    q = PartitionQueues()
    p0 = PartitionState(TP0, Progress())
    q.extend(TP0, items(sub, p0, range(0, 4)))
    q.pop_batch(2)
    assert q.drop_partition(TP0) == 2
    assert q.size == 0
    q.extend(TP0, items(sub, p0, range(4, 6)))
    assert [i.offset for i in q.pop_batch(5)] == [4, 5], "the new epoch is not held by the old batch"


def test_tracker_run_matches_one_by_one() -> None:
    a, b = OffsetTracker(), OffsetTracker()
    a.add_run([3, 4, 7, 9])
    for o in (3, 4, 7, 9):
        b.add(o)
    for t in (a, b):
        t.done(4)
        t.done(3)
    assert a.position == b.position == 7
    with pytest.raises(ValueError, match="not after 9"):
        a.add_run([8, 10])


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [("content-type", b"application/xml"), ("attempt", b"3")],
        [("attempt", b"x"), ("content-type", None)],
        [("attempt", b"0"), ("content-type", b"a"), ("content-type", b"text/json; charset=utf-8")],
        [("attempt", b"2"), ("attempt", None)],
    ],
)
async def test_wire_reads_the_headers_as_the_envelope_does(
    headers: list[tuple[str, Any]], sub: KafkaBatchSubscription
) -> None:
    rec = Rec(0, headers)
    d = KafkaBatchDelivery(sub, rec, PartitionState(TP0, Progress()), False)
    body, content_type, attempt = d.wire()
    m = Message.from_headers(headers, rec.value, key="k")
    if headers and headers[-1] == ("attempt", None):  # a null last repetition: documented difference
        assert attempt == 1
    else:
        assert (body, content_type, attempt) == (m.body, m.content_type, m.attempt)
    assert d.message.key == "k", "the envelope is built on first use"
    assert d.message.id


async def test_ack_all_now_is_all_or_nothing(sub: KafkaBatchSubscription) -> None:
    part = PartitionState(TP0, Progress())
    sub._parts[TP0] = part
    ds = items(sub, part, range(0, 3))
    for d in ds:
        part.tracker.add(d.offset)
    part.inflight = sub._unsettled = 3
    ds[1].settled = "reject"  # settled some other way already
    with pytest.raises(AlreadySettledError):
        KafkaBatchDelivery.ack_all_now(ds)
    assert ds[0].settled is None, "nothing settled half-way"
    assert ds[2].settled is None
    assert KafkaBatchDelivery.ack_all_now([ds[0], ds[2]]) == []
    assert sub._unsettled == 1
    assert part.inflight == 1
    assert part.tracker.position == 1, "offset 1 is still pending in the tracker"


@pytest.fixture
async def sub() -> AsyncIterator[KafkaBatchSubscription]:
    async def on_batch(_: Any) -> None:
        return None

    spec = SubscriptionSpec(destination="t", group="g", prefetch=10)
    s = KafkaBatchSubscription(spec, on_batch, BatchLimits(5, 0.0), KafkaSettings(bootstrap_servers="x:1"))
    yield s
    await s.client.stop()  # never started: closes what its constructor opened
