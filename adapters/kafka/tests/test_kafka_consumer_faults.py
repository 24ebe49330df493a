"""Kafka consume side under faults (rebalances, assignment, commits): each test failed before its fix.

Broker-free tests run on the stand-in consumer of ``consumer_fakes``; one runs on real
aiokafka and the Kafka-protocol broker.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    RebalanceInProgressError,
    UnknownMemberIdError,
)
from consumer_fakes import (
    TP0,
    _FakeConsumer,
    _subscription,
    _until,
)

from meshlink.transport.base import Delivery, SubscriptionSpec
from meshlink_kafka.consumer import KafkaSubscription

pytestmark = pytest.mark.filterwarnings("ignore")


# -- 1. a rebalance while the buffer is paused stops the subscription for good ------------------


async def test_rebalance_while_buffer_paused_does_not_stop_consumption_forever() -> None:
    """The poll loop pauses the partitions when the buffer stayed full for half the poll interval
    (``_buffer_paused``); only the dispatcher, on popping with the buffer at low water, undoes it.
    A revocation drops the buffered records (``drop_partition``): the dispatcher has nothing left
    to pop, ``_buffer_paused`` stays True, ``on_assigned`` re-pauses the new assignment, and the
    watchdog sees "buffer full" as a chosen idle state. Nothing is ever fetched again."""
    fake = _FakeConsumer()
    deliveries: list[Delivery] = []

    async def on_delivery(d: Delivery) -> None:
        deliveries.append(d)

    sub = await _subscription(fake, on_delivery, prefetch=1, max_buffered=4)
    for i in range(6):
        fake.produce(TP0, b"k", f'{{"n": {i}}}'.encode())
    await fake.rebalance({TP0})
    await sub.start()
    try:
        await _until(lambda: len(deliveries) == 1, what="first delivery")
        # the other five wait for key k behind the unsettled first one: the buffer is full
        await _until(lambda: sub._buffer_paused, what="buffer paused after the hold")
        assert fake.paused() == {TP0}

        # a member joins: eager rebalance, this member keeps partition 0
        async def ack_when_draining() -> None:
            await _until(lambda: any(p.draining for p in sub._parts.values()), what="draining")
            await deliveries[0].ack()

        acking = asyncio.ensure_future(ack_when_draining())
        await fake.rebalance({TP0})
        await acking
        assert fake.committed[TP0] == 1  # the first record finished and was committed on release

        # offsets 1..5 are uncommitted and the partition is ours: they must be delivered again
        await _until(
            lambda: len(deliveries) >= 2,
            timeout=5.0,
            what=lambda: (
                "delivery of offset 1 after the rebalance "
                f"(buffer_paused={sub._buffer_paused}, client paused={fake.paused()}, "
                f"buffered={sub._sched.size}, idle_reason={sub.idle_reason()!r})"
            ),
        )
        assert deliveries[1].location["offset"] == "1"
    finally:
        await sub.close()


async def test_revocation_during_the_full_buffer_hold_does_not_stop_consumption_forever() -> None:
    """Same root cause, other timing: the revocation empties the buffer while the poll loop is
    still holding (waiting on ``_room``); when the hold expires it sets ``_buffer_paused`` without
    looking at the (now empty) buffer, and nothing ever clears it."""
    fake = _FakeConsumer()
    deliveries: list[Delivery] = []

    async def on_delivery(d: Delivery) -> None:
        deliveries.append(d)

    sub = await _subscription(fake, on_delivery, prefetch=1, max_buffered=4)
    for i in range(6):
        fake.produce(TP0, b"k", f'{{"n": {i}}}'.encode())
    await fake.rebalance({TP0})
    await sub.start()
    try:
        await _until(lambda: len(deliveries) == 1 and sub._sched.size == 5, what="buffer full")
        assert not sub._buffer_paused  # still inside the 0.5 s hold

        async def ack_when_draining() -> None:
            await _until(lambda: any(p.draining for p in sub._parts.values()), what="draining")
            await deliveries[0].ack()

        acking = asyncio.ensure_future(ack_when_draining())
        await fake.rebalance({TP0})
        await acking
        await _until(
            lambda: len(deliveries) >= 2,
            timeout=5.0,
            what=lambda: (
                "delivery of offset 1 after the rebalance "
                f"(buffer_paused={sub._buffer_paused}, client paused={fake.paused()}, "
                f"buffered={sub._sched.size}, idle_reason={sub.idle_reason()!r})"
            ),
        )
    finally:
        await sub.close()


# -- 2. records returned while on_assigned awaits previous_progress are dropped, then committed past


async def test_records_fetched_while_assignment_callback_runs_are_not_lost() -> None:
    """aiokafka makes the new assignment fetchable (``reassignment_in_progress = False``) before it
    calls ``on_partitions_assigned``. ``on_assigned`` first awaits ``previous_progress`` (an
    OffsetFetch round trip to the coordinator) and only then creates the PartitionState. Records
    ``getmany`` returns meanwhile are dropped by ``accept`` (no state for the partition) although
    the client's position moved past them; the tracker then starts at the next record fetched and
    the committer commits past the dropped ones: they are never delivered (lost)."""
    fake = _FakeConsumer()
    fake._coordinator.gate.clear()  # the OffsetFetch of previous_progress is slow
    deliveries: list[Delivery] = []

    async def on_delivery(d: Delivery) -> None:
        deliveries.append(d)
        await d.ack()

    sub = await _subscription(fake, on_delivery, prefetch=8)
    for i in range(3):
        fake.produce(TP0, f"k{i}".encode())
    rebalancing = asyncio.ensure_future(fake.rebalance({TP0}))
    starting = asyncio.ensure_future(sub.start())
    try:
        await _until(lambda: fake._coordinator.asked == 1, what="on_assigned asking for progress")
        # the poll loop runs meanwhile: with the current code it takes the three records
        polls = fake.polls
        await _until(lambda: fake.polls > polls, what="a poll answered while on_assigned waits")
        fake._coordinator.gate.set()
        await rebalancing
        await starting
        for i in range(3, 5):
            fake.produce(TP0, f"k{i}".encode())
        await _until(lambda: len(deliveries) >= 2, what="later records delivered")
        await _until(lambda: fake.committed.get(TP0, 0) >= 5, what="commit")
        delivered = sorted(int(d.location["offset"]) for d in deliveries)
        committed = fake.committed[TP0]
        lost = [o for o in range(committed) if o not in delivered]
        assert not lost, f"offsets {lost} committed (position {committed}) but never delivered"
    finally:
        fake._coordinator.gate.set()
        await sub.close()


# -- 2b. the same loss with the real aiokafka client (a broker is needed) ----------------------------


async def test_broker_records_returned_during_a_slow_assignment_callback_are_not_lost(
    kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shows that aiokafka really returns records of a new assignment while
    ``on_partitions_assigned`` runs. ``previous_progress`` is wrapped to stand for a slow OffsetFetch
    answer: it returns once the poll loop has taken records of a partition that has no state yet
    (or after 15 s, when aiokafka would not hand any out meanwhile: then the test passes)."""
    from kafka_helpers import Worker, committed_offsets, keyed_messages, publish_all, transport, unique

    import meshlink_kafka.consumer as consumer_mod

    topic, group = unique("assign-race"), "billing"
    opts = {"partitions": 1, "commit_interval": 0.05}
    spec = SubscriptionSpec(destination=topic, group=group, prefetch=16)
    dropped: list[int] = []
    subs: list[KafkaSubscription] = []
    original_accept = consumer_mod.accept
    original_progress = consumer_mod.previous_progress

    def accept(batches: Any, parts: Any, buffer: Any) -> None:
        for tp, records in batches.items():
            if tp not in parts:
                dropped.extend(r.offset for r in records)
        original_accept(batches, parts, buffer)

    async def slow_previous_progress(*args: Any) -> Any:
        out = await original_progress(*args)
        with contextlib.suppress(AssertionError):
            await _until(lambda: bool(dropped), timeout=15.0)
        return out

    monkeypatch.setattr(consumer_mod, "accept", accept)
    monkeypatch.setattr(consumer_mod, "previous_progress", slow_previous_progress)
    worker = Worker()
    producer, consumer = transport(kafka_bootstrap, **opts), transport(kafka_bootstrap, **opts)
    sent = keyed_messages(20, 4)
    try:
        await producer.connect()
        await consumer.connect()
        await producer.declare(topic, group)
        await publish_all(producer, topic, sent[:10])
        sub = await consumer.subscribe(spec, worker)
        assert isinstance(sub, KafkaSubscription)
        subs.append(sub)
        await publish_all(producer, topic, sent[10:])
        await _until(lambda: len({h.id for h in worker.handled}) >= 10, timeout=30, what="handling")
        group_id = sub.group_id
        await _until(
            lambda: sub._parts[TopicPartition(topic, 0)].tracker.position == 20,
            timeout=30,
            what="everything taken settled",
        )
        await _until(
            lambda: (
                sub._parts[TopicPartition(topic, 0)].committed is not None
                and sub._parts[TopicPartition(topic, 0)].committed[0] == 20
            ),
            timeout=30,
            what="commit",
        )
    finally:
        await consumer.close()
        await producer.close()
    committed = await committed_offsets(kafka_bootstrap, group_id, topic, 1)
    handled = {h.id for h in worker.handled}
    lost = [i for i, m in enumerate(sent) if m.id not in handled]
    assert not lost, (
        f"messages at offsets {lost} were never handed out (dropped while on_assigned ran: {dropped}); "
        f"committed position: {committed[0]}"
    )


# -- commits refused or failing -------------------------------------------------------------------


class _Committing:
    """A consumer whose commits fail with ``errors`` in turn, then succeed."""

    def __init__(self, tp: TopicPartition, errors: list[BaseException]) -> None:
        self.tp = tp
        self.errors = errors
        self.committed: list[dict[TopicPartition, tuple[int, str]]] = []
        self.tries = 0

    def assignment(self) -> set[TopicPartition]:
        return {self.tp}

    async def commit(self, offsets: dict[TopicPartition, tuple[int, str]]) -> None:
        self.tries += 1
        if self.errors:
            raise self.errors.pop(0)
        self.committed.append(offsets)


def _settled_part(tp: TopicPartition, upto: int) -> Any:
    from meshlink_kafka.delivery import PartitionState
    from meshlink_kafka.progress import Progress

    part = PartitionState(tp, Progress())
    for offset in range(upto):
        part.tracker.add(offset)
        part.tracker.done(offset)
    return part


@pytest.mark.parametrize(
    "error",
    [CommitFailedError("x"), RebalanceInProgressError(), IllegalGenerationError(), UnknownMemberIdError()],
    ids=lambda e: type(e).__name__,
)
async def test_a_commit_refused_by_a_rebalance_is_not_recorded_and_is_sent_again(
    error: BaseException,
) -> None:
    from meshlink_kafka.commits import commit_settled

    tp = TopicPartition("t", 0)
    part = _settled_part(tp, 5)
    consumer = _Committing(tp, [error])
    assert await commit_settled(consumer, [part], bootstrap="b", group_id="g") is True
    assert part.committed is None  # not recorded as committed: the next round sends it again
    assert await commit_settled(consumer, [part], bootstrap="b", group_id="g") is True
    assert [offsets[tp][0] for offsets in consumer.committed] == [5]
    assert part.committed is not None


async def test_the_committer_goes_on_after_a_commit_raises_something_unexpected() -> None:
    from meshlink_kafka.commits import Committer

    tp = TopicPartition("t", 0)
    part = _settled_part(tp, 3)
    consumer = _Committing(tp, [RuntimeError("client bug")])
    closed = False
    committer = Committer(
        interval=0.001,
        every=1,
        bootstrap="b",
        group_id="g",
        client=lambda: consumer,
        parts=lambda: [part],
        closed=lambda: closed,
    )
    task = asyncio.get_running_loop().create_task(committer.run())
    try:
        await _until(lambda: bool(consumer.committed))
        assert consumer.tries >= 2
        assert consumer.committed[0][tp][0] == 3
    finally:
        closed = True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_progress_lookup_that_fails_does_not_leave_the_new_assignment_paused() -> None:
    """on_assigned pauses the new partitions until their state exists; a progress lookup that
    raises something other than a KafkaError used to leave them paused until the next rebalance."""
    from meshlink_kafka.progress import previous_progress

    class Coordinator:
        async def fetch_committed_offsets(self, tps: set[TopicPartition]) -> dict[TopicPartition, Any]:
            raise TimeoutError("coordinator did not answer")

    class Client:
        _coordinator = Coordinator()

    tp = TopicPartition("t", 0)
    progress = await previous_progress(Client(), "b", "g", {tp})
    assert set(progress) == {tp}  # the committed offsets alone apply
