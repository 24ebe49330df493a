"""Kafka publish and control paths under faults (topics, transport.publish, watchdog).

Each test failed before its fix and states the contract it checks.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from aiokafka import TopicPartition
from producer_fakes import _Client, _settle_all, _until

from meshlink.errors import PublishError, TransportError
from meshlink.message import Message
from meshlink.transport.base import SubscriptionSpec
from meshlink_kafka import KafkaSettings, KafkaTransport
from meshlink_kafka.consumer import KafkaSubscription
from meshlink_kafka.watchdog import StallWatchdog

TP = TopicPartition("t", 0)


# -- fakes -------------------------------------------------------------------------------------


class _CreateResponse:
    def __init__(self, errors: list[tuple[str, int, str | None]]) -> None:
        self.topic_errors = errors


class _Admin:
    """An admin client whose create_topics can be held, or answer with an error code."""

    def __init__(self, code: int = 0) -> None:
        self.code = code
        self.creating = asyncio.Event()
        self.proceed = asyncio.Event()
        self.proceed.set()

    async def create_topics(self, new: list[Any]) -> _CreateResponse:
        self.creating.set()
        await self.proceed.wait()
        return _CreateResponse([(t.name, self.code, "refused" if self.code else None) for t in new])

    async def describe_topics(self, topics: list[str]) -> list[dict[str, Any]]:
        return [{"topic": t, "error_code": 0, "partitions": [{"partition": 0}]} for t in topics]

    async def close(self) -> None:
        pass


def _transport(admin: _Admin, client: _Client) -> KafkaTransport:
    """A connected-looking transport on fakes (no broker)."""
    t = KafkaTransport("kafka://127.0.0.1:1")
    t._topics._admin = admin  # type: ignore[assignment]
    t._producer._producer = client  # type: ignore[assignment]
    t._connected = True
    return t


# -- 1. topics.ensure hands one publisher's cancellation to every concurrent publisher ---------


async def test_a_cancelled_publisher_creating_a_topic_does_not_cancel_another_publisher() -> None:
    """topics.py:76-79: the creator's CancelledError is set on the shared future, so a second,
    never-cancelled publisher of the same new topic gets a raw CancelledError (its task ends
    as cancelled) instead of a success or a PublishError."""
    admin = _Admin()
    admin.proceed.clear()  # creation under way
    client = _Client()
    t = _transport(admin, client)
    first = asyncio.ensure_future(t.publish("orders", Message(body=b"1")))
    await admin.creating.wait()
    second = asyncio.ensure_future(t.publish("orders", Message(body=b"2")))
    for _ in range(5):
        await asyncio.sleep(0)  # the second now waits on the shared creation
    first.cancel()  # the first publisher's caller gives up (its own business)
    with contextlib.suppress(asyncio.CancelledError):
        await first
    admin.proceed.set()
    settle = asyncio.ensure_future(_settle_all(client, 1))
    try:
        await asyncio.wait_for(asyncio.gather(second, return_exceptions=True), 2)
    finally:
        settle.cancel()
    assert not second.cancelled(), "a publisher nobody cancelled ended with CancelledError"
    exc = second.exception()
    assert exc is None or isinstance(exc, PublishError), repr(exc)


# -- 2. publish raises TransportError (not PublishError) when the topic cannot be created -----


async def test_a_topic_that_cannot_be_created_fails_publish_with_a_publish_error() -> None:
    """transport.py:178-183 catches only KafkaError, but topics.ensure turns the admin's refusal
    into TransportError (topics.py:99-104): publish() raises a TransportError that is not a
    PublishError, against the publish contract (publish_many does wrap it in PublishBatchError)."""
    t = _transport(_Admin(code=38), _Client())  # 38: INVALID_REPLICATION_FACTOR
    try:
        await t.publish("orders", Message(body=b"x"))
    except PublishError:
        pass
    except Exception as exc:
        raise AssertionError(f"publish raised {type(exc).__name__}, not a PublishError: {exc}") from exc
    else:
        raise AssertionError("publish reported success for a record that was never sent")


# -- 3. the watchdog recreates a healthy consumer that a record reached just before a look ------


class _Client2:
    def __init__(self) -> None:
        self.end = 4
        self.pos = 4

    def assignment(self) -> set[TopicPartition]:
        return {TP}

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.end for tp in tps}

    async def position(self, tp: TopicPartition) -> int:
        return self.pos


class _Healthy:
    """Caught up (position == end), idle because nothing was published for a whole interval."""

    group_id = "g.t"

    def __init__(self) -> None:
        self.client = _Client2()
        self.activity = 7
        self.replaced = 0

    def idle_reason(self) -> str | None:
        return None

    def positions(self) -> dict[TopicPartition, int]:
        return {TP: self.client.pos}

    async def replace_client(self) -> None:
        self.replaced += 1


async def test_a_record_published_just_before_a_look_does_not_make_a_caught_up_consumer_stalled() -> None:
    """watchdog.py:328-339: lag is sampled once, at the look itself. A caught-up member of a quiet
    topic (nothing to fetch for a whole interval, so no activity) whose next record was
    published a moment before the look (its fetch not back yet: up to fetch_max_wait_ms) is
    judged stalled and recreated — a rebalance of a healthy member. The lag was not there at
    the previous look, so nothing proves the client failed to fetch it."""
    sub = _Healthy()
    dog = StallWatchdog(sub, interval=60, ask_timeout=5)
    await dog.check()  # baseline: caught up, end == position
    await dog.check()  # a quiet interval: still caught up, no activity, no lag
    sub.client.end = 5  # a record lands a few ms before the next look; the fetch is in flight
    await dog.check()
    assert sub.replaced == 0, "a healthy, caught-up consumer was recreated"


# -- 4. closing during a recreation: the watchdog swallows its own cancellation ----------------


class _Consumer:
    def assignment(self) -> set[TopicPartition]:
        return set()

    def pause(self, *tps: TopicPartition) -> None:
        pass

    def resume(self, *tps: TopicPartition) -> None:
        pass


class _Member:
    def __init__(self) -> None:
        self.client = _Consumer()
        self.replaced_after_close: list[bool] = []
        self.closed = False
        self.stopped = False

    def retire(self) -> None:
        pass

    async def replace(self) -> None:
        # the real Member stops the old client and starts (joins the group with) a new one
        self.replaced_after_close.append(self.closed)

    async def stop(self) -> None:
        self.stopped = True


async def test_close_during_a_watchdog_recreation_is_bounded_and_joins_no_new_client() -> None:
    """consumer.py:224-226 (replace_client): ``with suppress(CancelledError): await poll`` also
    swallows the cancellation of the watchdog task itself. A close() landing while the watchdog
    waits for the old poll loop to end: the watchdog carries on, starts a new client after the
    close, and goes back to sleep — and close(), which awaits the watchdog task, never returns."""
    settings = KafkaSettings(stall_timeout=0.01, fetch_max_wait_ms=0)
    sub = KafkaSubscription(
        SubscriptionSpec(destination="t", group="g"), lambda d: asyncio.sleep(0), settings
    )
    member = _Member()
    sub._member = member  # type: ignore[assignment]
    poll_cancelled = asyncio.Event()
    poll_may_end = asyncio.Event()

    async def poll() -> None:  # aiokafka's getmany tidies up for a moment when cancelled
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            poll_cancelled.set()
            await poll_may_end.wait()
            raise

    assert sub.watchdog is not None
    looks = 0

    async def stalled() -> dict[TopicPartition, int]:
        nonlocal looks
        looks += 1
        return {TP: 1} if looks == 1 else {}

    sub.watchdog.stalled = stalled  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    sub._tasks = [loop.create_task(poll()), loop.create_task(sub.watchdog.run())]
    await poll_cancelled.wait()  # the watchdog is recreating: waiting for the old poll loop
    closing = asyncio.ensure_future(sub.close())
    await _until(lambda: sub._closed)  # close() has cancelled the tasks
    member.closed = True
    poll_may_end.set()
    try:
        await asyncio.wait_for(asyncio.shield(closing), 2)
    except TimeoutError:
        for task in sub._tasks:
            task.cancel()
        closing.cancel()
        raise AssertionError(
            f"close() hung; new client started after close: {member.replaced_after_close}"
        ) from None
    assert True not in member.replaced_after_close, "a new client joined the group after close()"


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
