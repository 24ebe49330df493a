"""A member whose client stops fetching while records wait is recreated (aiokafka #1154).

The client is made to stall deterministically: one ``AIOKafkaConsumer``
instance's ``getmany`` returns nothing, as a stuck client does, while the
broker holds records for its partitions.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from aiokafka import TopicPartition
from kafka_helpers import Progress, Worker, keyed_messages, publish_all, transport, unique
from structlog.testing import capture_logs

from meshlink.errors import ConfigurationError
from meshlink.transport.base import SubscriptionSpec
from meshlink_kafka import KafkaSettings, KafkaTransport
from meshlink_kafka.consumer import KafkaSubscription
from meshlink_kafka.watchdog import StallWatchdog, broker_lag

STALL = 1.0
PREFETCH = 8
TP = TopicPartition("t", 0)


def stall(client: Any) -> asyncio.Event:
    """From now on this one client fetches nothing, however many records wait.

    The returned event is set once the poll loop is inside the stalled fetch (a
    fetch already under way when the client was stalled may still return records).
    """
    polling = asyncio.Event()

    async def getmany(*partitions: TopicPartition, timeout_ms: int = 0, max_records: Any = None) -> Any:
        polling.set()
        await asyncio.sleep(timeout_ms / 1000)
        return {}

    client.getmany = getmany
    return polling


def announce_looks(watchdog: StallWatchdog) -> Progress:
    """Poke the returned progress after each look of the running watchdog."""
    looks = Progress()
    check = watchdog.check

    async def check_and_poke() -> None:
        await check()
        looks.poke()

    watchdog.check = check_and_poke  # type: ignore[method-assign]
    return looks


def subscription(sub: object) -> KafkaSubscription:
    assert isinstance(sub, KafkaSubscription)
    assert sub.watchdog is not None
    return sub


# -- against the broker ----------------------------------------------------------------------


async def test_stalled_client_is_recreated_and_every_message_is_handled(kafka_bootstrap: str) -> None:
    topic = unique("stall")
    t = transport(kafka_bootstrap, stall_timeout=STALL)
    progress = Progress()
    worker = Worker(on_progress=progress.poke)
    sent = keyed_messages(400, 8)
    before, after = sent[:100], sent[100:]
    await t.connect()
    try:
        with capture_logs() as logs:
            sub = subscription(
                await t.subscribe(SubscriptionSpec(destination=topic, group="g", prefetch=PREFETCH), worker)
            )
            await publish_all(t, topic, before)
            await progress.until(lambda: len(worker.handled) >= len(before), timeout=30)

            stuck = sub.client
            await asyncio.wait_for(stall(stuck).wait(), timeout=10)
            await publish_all(t, topic, after)
            everything = {m.id for m in before + after}
            await progress.until(lambda: {h.id for h in worker.handled} >= everything, timeout=45)
    finally:
        await worker.crash_handlers()
        await t.close()

    assert sub.client is not stuck
    assert sub.watchdog is not None
    assert sub.watchdog.recreations >= 1
    stalls = [e for e in logs if e["event"].startswith("kafka consumer stalled")]
    assert stalls, "no stall was reported"
    assert stalls[0]["log_level"] == "warning"
    assert stalls[0]["group"] == sub.group_id
    assert stalls[0]["partitions"]
    counts = Counter(h.id for h in worker.handled)
    assert set(counts) == everything, "a message was lost"
    assert sum(n - 1 for n in counts.values()) <= PREFETCH  # duplicates: the in-flight window at most


async def test_paused_subscription_with_lag_is_not_stalled(kafka_bootstrap: str) -> None:
    topic = unique("stall-paused")
    t = transport(kafka_bootstrap, stall_timeout=STALL)
    progress = Progress()
    worker = Worker(on_progress=progress.poke)
    sent = keyed_messages(50, 4)
    await t.connect()
    try:
        sub = subscription(
            await t.subscribe(SubscriptionSpec(destination=topic, group="g", prefetch=PREFETCH), worker)
        )
        watchdog = sub.watchdog
        assert watchdog is not None
        client = sub.client
        await sub.pause()
        await publish_all(t, topic, sent)
        assert await broker_lag(client, sub.positions()), "the broker should report lag"
        looks = announce_looks(watchdog)
        looked = watchdog.checks
        await looks.until(lambda: watchdog.checks >= looked + 3, timeout=30)
        assert await watchdog.stalled() == {}
        assert watchdog.recreations == 0
        assert sub.client is client
        assert worker.handled == []

        await sub.resume()
        await progress.until(lambda: len(worker.handled) >= len(sent), timeout=30)
        assert sub.client is client
    finally:
        await worker.crash_handlers()
        await t.close()


# -- the watchdog's judgement, without a broker -------------------------------------------------


class FakeClient:
    def __init__(self, end: int, position: int | None) -> None:
        self.end = end
        self.known = position

    def assignment(self) -> set[TopicPartition]:
        return {TP}

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.end for tp in tps}

    async def position(self, tp: TopicPartition) -> int:
        if self.known is None:
            await asyncio.Event().wait()  # never learns its position
        assert self.known is not None
        return self.known


class FakeSubscription:
    group_id = "g.t"

    def __init__(self, end: int, position: int | None, taken_upto: int = -1) -> None:
        self.client = FakeClient(end, position)
        self.activity = 0
        self.idle: str | None = None
        self.taken_upto = taken_upto
        self.replaced = 0
        self.fail_replace = False

    def idle_reason(self) -> str | None:
        return self.idle

    def positions(self) -> dict[TopicPartition, int]:
        return {TP: self.taken_upto}

    async def replace_client(self) -> None:
        if self.fail_replace:
            raise ConnectionError("broker gone")
        self.replaced += 1


async def test_no_fetch_between_two_looks_with_lag_recreates_the_client() -> None:
    sub = FakeSubscription(end=10, position=4)
    dog = StallWatchdog(sub, interval=STALL, ask_timeout=5)
    await dog.check()  # the first look only notes the progress so far
    assert sub.replaced == 0
    with capture_logs() as logs:
        await dog.check()
    assert sub.replaced == 1
    assert dog.recreations == 1
    warning = next(e for e in logs if e["log_level"] == "warning")
    assert warning["partitions"] == ["t:0"]
    assert warning["lag"] == 6


@pytest.mark.parametrize("idle", ["paused", "stopped", "buffer full", "no partitions", "rebalancing"])
async def test_idle_by_choice_is_not_a_stall(idle: str) -> None:
    sub = FakeSubscription(end=10, position=4)
    sub.idle = idle
    dog = StallWatchdog(sub, interval=STALL, ask_timeout=5)
    for _ in range(3):
        await dog.check()
    assert sub.replaced == 0


async def test_progress_between_looks_is_not_a_stall() -> None:
    sub = FakeSubscription(end=10, position=4)
    dog = StallWatchdog(sub, interval=STALL, ask_timeout=5)
    for _ in range(3):
        sub.activity += 1
        await dog.check()
    assert sub.replaced == 0


async def test_a_position_past_records_never_handed_out_is_no_lag() -> None:
    # the last record taken was offset 7; a transaction marker (or compacted-away records)
    # fills offsets 8 and 9, which the client's position has moved past
    sub = FakeSubscription(end=10, position=10, taken_upto=8)
    dog = StallWatchdog(sub, interval=STALL, ask_timeout=5)
    for _ in range(3):
        await dog.check()
    assert sub.replaced == 0


async def test_a_resume_between_looks_restarts_the_clock() -> None:
    sub = FakeSubscription(end=10, position=4)
    dog = StallWatchdog(sub, interval=STALL, ask_timeout=5)
    await dog.check()
    sub.idle = "paused"
    await dog.check()
    sub.idle = None  # resumed just before the next look
    await dog.check()
    assert sub.replaced == 0
    await dog.check()
    assert sub.replaced == 1


async def test_a_client_that_never_learns_its_position_is_judged_by_what_was_taken() -> None:
    assert await broker_lag(FakeClient(end=3, position=None), {TP: -1}) == {TP: 3}
    assert await broker_lag(FakeClient(end=3, position=None), {TP: 3}) == {}


async def test_a_failed_recreation_is_retried_at_the_next_look() -> None:
    sub = FakeSubscription(end=10, position=4)
    sub.fail_replace = True
    dog = StallWatchdog(sub, interval=STALL, ask_timeout=5)
    await dog.check()
    await dog.check()
    assert dog.recreations == 0
    sub.fail_replace = False
    await dog.check()
    assert sub.replaced == 1
    assert dog.recreations == 1


# -- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{"stall_timeout": -1.0}, {"stall_timeout": 0.2, "fetch_max_wait_ms": 500}],
)
def test_a_stall_timeout_that_cannot_work_is_refused_naming_the_setting(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError) as err:
        KafkaTransport("kafka://h:1", **options)
    assert err.value.setting == "stall_timeout"


async def test_stall_timeout_defaults_to_a_minute_and_zero_turns_the_watchdog_off() -> None:
    assert KafkaSettings().stall_timeout == 60.0
    settings = KafkaSettings.from_url("kafka://h:1/?stall_timeout=0")

    async def ignore(delivery: object) -> None:
        return None

    sub = KafkaSubscription(SubscriptionSpec(destination="t", group="g"), ignore, settings)
    try:
        assert sub.watchdog is None
    finally:
        await sub.client.stop()
