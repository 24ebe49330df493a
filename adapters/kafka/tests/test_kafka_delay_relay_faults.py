"""The Kafka delay relay under faults: each test failed before its fix (broker-free)."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import (
    NodeNotReadyError,
)
from consumer_fakes import (
    _FakeConsumer,
    _Rec,
    _settings,
    _until,
)

from meshlink.errors import TransportError
from meshlink_kafka.delay import H_DELAY_DUE, H_DELAY_TARGET, DelayRelay

pytestmark = pytest.mark.filterwarnings("ignore")


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
