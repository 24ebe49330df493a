"""Kafka consume side under faults (subscription, delay relay): each test failed before its fix.

Broker-free: a small stand-in for aiokafka's consumer (``_FakeConsumer``) models what the code
relies on — records returned by ``getmany`` for assigned, unpaused partitions from the consumed
position on; an eager rebalance that revokes everything, then assigns and resets positions to the
committed offsets (aiokafka clears ``reassignment_in_progress`` *before* it calls
``on_partitions_assigned``, so ``getmany`` returns records of the new assignment while that
callback still runs); pause/resume; explicit commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    IllegalStateError,
    NodeNotReadyError,
    RebalanceInProgressError,
    UnknownMemberIdError,
)

from meshlink.errors import TransportError
from meshlink.transport.base import Delivery, SubscriptionSpec
from meshlink_kafka import KafkaSettings
from meshlink_kafka.consumer import KafkaSubscription
from meshlink_kafka.delay import H_DELAY_DUE, H_DELAY_TARGET, DelayRelay

pytestmark = pytest.mark.filterwarnings("ignore")

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


# -- 3. the delay relay: an error while preparing a republish ---------------------------------------


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(0)


class _Producer:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    async def send_many(self, records: list[Any]) -> list[BaseException | None]:
        self.sent.extend(records)
        return [None] * len(records)


class _Topics:
    """``ensure`` raises ``errors`` in turn, then succeeds (the admin client had a transient fault)."""

    def __init__(self, errors: list[BaseException]) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def ensure(self, topic: str) -> int:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return 3


def _delayed(fake: _FakeConsumer, tp: TopicPartition, target: str, due_ms: int, n: int) -> _Rec:
    return fake.produce(
        tp,
        f"key{n}".encode(),
        f'{{"n": {n}}}'.encode(),
        headers=[
            ("ce_id", f"id{n}".encode()),
            (H_DELAY_TARGET, target.encode()),
            (H_DELAY_DUE, str(due_ms).encode()),
        ],
    )


async def test_delay_relay_keeps_a_due_record_when_preparing_its_republish_fails() -> None:
    """``_forward_due`` pops the due records off the head queue, then ``_republish`` awaits
    ``topics.ensure(target)``. ``ensure`` can raise a raw ``KafkaError`` (``describe_topics``,
    or ``list_topics`` with create_topics off, are not translated). ``_run`` catches it and goes on,
    but the popped records are never put back: the next due record is republished and committed
    past them, so the delayed message (e.g. a scheduled redelivery) is lost."""
    fake = _FakeConsumer(topic="meshlink.delay.1s")
    tp = TopicPartition("meshlink.delay.1s", 0)
    topics = _Topics([NodeNotReadyError("admin connection lost")])
    producer = _Producer()
    relay = DelayRelay(_settings(), producer, topics, _Clock(1_000.0))  # type: ignore[arg-type]
    relay._consumer = fake  # type: ignore[assignment]
    fake.assigned = {tp}
    fake.position_of = {tp: 0}
    relay._heads[tp] = deque()
    _delayed(fake, tp, "orders", 999_000, 0)  # due already
    relay._task = asyncio.get_running_loop().create_task(relay._run())
    try:
        await _until(lambda: topics.calls >= 1, what="first republish attempt")
        _delayed(fake, tp, "orders", 999_000, 1)
        await _until(lambda: fake.committed.get(tp, 0) >= 2, what="relay committing past both records")
        sent = [r.message_id for r in producer.sent]
        assert "id0" in sent, f"offset 0 committed past but never republished (republished: {sent})"
    finally:
        await relay.stop()


async def test_delay_relay_survives_a_transient_topic_error() -> None:
    """``topics.ensure`` turns an admin ``KafkaError`` into ``TransportError`` (and raises
    ``UnroutableError`` for a missing topic with create_topics off). ``_run`` only catches
    ``KafkaError``: the relay task dies, silently (``stop()`` suppresses its exception), and no
    delayed message or scheduled redelivery is forwarded by this process any more."""
    fake = _FakeConsumer(topic="meshlink.delay.1s")
    tp = TopicPartition("meshlink.delay.1s", 0)
    topics = _Topics([TransportError("cannot create topic: RequestTimedOutError", destination="orders")])
    producer = _Producer()
    relay = DelayRelay(_settings(), producer, topics, _Clock(1_000.0))  # type: ignore[arg-type]
    relay._consumer = fake  # type: ignore[assignment]
    fake.assigned = {tp}
    fake.position_of = {tp: 0}
    relay._heads[tp] = deque()
    _delayed(fake, tp, "orders", 999_000, 0)
    relay._task = asyncio.get_running_loop().create_task(relay._run())
    task = relay._task
    try:
        await _until(lambda: topics.calls >= 1, what="first republish attempt")
        await _until(
            lambda: bool(producer.sent) or task.done(),
            what="a retried republish (or the relay task ending)",
        )
        assert not task.done(), f"delay relay task died: {task.exception()!r}"
        assert [r.message_id for r in producer.sent] == ["id0"]
    finally:
        await relay.stop()


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


# -- declare: a seeding client that does not stop in time ---------------------------------------


async def test_declare_with_a_seeding_client_that_does_not_stop_in_time_still_seeds_the_group(
    kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The short-lived client that seeds a new group is stopped within ``close_timeout``; a stop
    that takes longer was a raw ``TimeoutError`` out of ``declare()`` (which promises
    ``TransportError``), although the group had been seeded."""
    from aiokafka import AIOKafkaConsumer
    from kafka_helpers import transport, unique

    import meshlink_kafka.topics as topics_mod

    stop_started = asyncio.Event()

    class SlowToStop(AIOKafkaConsumer):  # type: ignore[misc]
        async def stop(self) -> None:
            stop_started.set()
            await asyncio.Event().wait()  # never: wait_for gives up after close_timeout

    monkeypatch.setattr(topics_mod, "AIOKafkaConsumer", SlowToStop)
    t = transport(kafka_bootstrap, close_timeout=0.2)
    await t.connect()
    try:
        topic = unique("seed-stop")
        await t.declare(topic, "billing")  # raised TimeoutError before
        assert stop_started.is_set()
        assert (topic, t.settings.group_id(topic, "billing")) in t._topics._seeded
    finally:
        monkeypatch.undo()
        await t.close()


async def test_declare_turns_a_timeout_into_a_transport_error(
    kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kafka_helpers import transport, unique

    t = transport(kafka_bootstrap)
    await t.connect()
    try:

        async def times_out(topic: str) -> int:
            raise TimeoutError

        monkeypatch.setattr(t._topics, "ensure", times_out)
        with pytest.raises(TransportError, match="cannot declare"):
            await t.declare(unique("declare-timeout"))
    finally:
        await t.close()


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


async def test_delay_relay_drops_a_record_for_a_topic_that_cannot_exist_and_goes_on() -> None:
    """With create_topics off, a delayed record for a topic that does not exist would be retried
    for good and hold every delayed record behind it on its partition: it is dropped (logged)."""
    from meshlink.errors import UnroutableError

    fake = _FakeConsumer(topic="meshlink.delay.1s")
    tp = TopicPartition("meshlink.delay.1s", 0)
    never = [UnroutableError("topic does not exist and create_topics is off", destination="gone")]
    topics = _Topics(never * 1_000)
    producer = _Producer()
    relay = DelayRelay(_settings(), producer, topics, _Clock(1_000.0))  # type: ignore[arg-type]
    relay._consumer = fake  # type: ignore[assignment]
    fake.assigned = {tp}
    fake.position_of = {tp: 0}
    relay._heads[tp] = deque()
    _delayed(fake, tp, "gone", 999_000, 0)
    relay._task = asyncio.get_running_loop().create_task(relay._run())
    try:
        await _until(lambda: topics.calls >= 1, what="first republish attempt")
        topics.errors.clear()  # every other topic exists
        _delayed(fake, tp, "orders", 999_000, 1)
        await _until(lambda: fake.committed.get(tp, 0) >= 2, what="relay committing past both records")
        assert [r.message_id for r in producer.sent] == ["id1"]
    finally:
        await relay.stop()


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
