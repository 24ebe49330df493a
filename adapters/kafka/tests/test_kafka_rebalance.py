"""A second member joins and leaves mid-stream: nothing lost, duplicates bounded and counted."""

from __future__ import annotations

import asyncio
from collections import Counter

from kafka_helpers import Progress, Worker, keyed_messages, publish_all, transport, unique

from meshlink.transport.base import SubscriptionSpec

MESSAGES = 6_000
PREFETCH = 16


async def test_member_joining_and_leaving_mid_stream_loses_nothing(kafka_bootstrap: str) -> None:
    topic, group = unique("rebalance"), "billing"
    opts = {"partitions": 6}
    spec = SubscriptionSpec(destination=topic, group=group, prefetch=PREFETCH)
    progress = Progress()
    a_worker = Worker(on_progress=progress.poke, max_delay=0.004)
    b_worker = Worker(on_progress=progress.poke, max_delay=0.004, run=1)
    producer, a, b = (transport(kafka_bootstrap, **opts) for _ in range(3))
    for t in (producer, a, b):
        await t.connect()

    def handled() -> int:
        return len(a_worker.handled) + len(b_worker.handled)

    b_joined, b_left = asyncio.Event(), asyncio.Event()
    sent = keyed_messages(MESSAGES, 60)
    third = MESSAGES // 3

    async def publisher() -> None:
        # the stream goes on across both membership changes: each third waits for one of them
        await publish_all(producer, topic, sent[:third], chunk=250)
        await b_joined.wait()
        await publish_all(producer, topic, sent[third : 2 * third], chunk=250)
        await b_left.wait()
        await publish_all(producer, topic, sent[2 * third :], chunk=250)

    try:
        await producer.declare(topic, group)
        await a.subscribe(spec, a_worker)
        publishing = asyncio.create_task(publisher())

        await progress.until(lambda: handled() >= third // 2, timeout=60)
        b_sub = await b.subscribe(spec, b_worker)  # returns after the rebalance assigned its share
        joined_at = handled()
        b_joined.set()
        await progress.until(lambda: len(b_worker.handled) >= 300, timeout=60)
        await b_sub.stop()  # graceful: in-flight finish, commit, leave
        await progress.until(lambda: not b_worker.tasks, timeout=30)
        await b.close()
        left_at = handled()
        b_left.set()
        await publishing
        everything = {m.id for m in sent}
        await progress.until(lambda: {h.id for h in a_worker.handled + b_worker.handled} >= everything, 120)
    finally:
        for t in (a, b, producer):
            await t.close()

    all_handled = a_worker.handled + b_worker.handled
    counts = Counter(h.id for h in all_handled)
    duplicates = sum(n - 1 for n in counts.values())
    print(
        f"\nrebalance: {MESSAGES} messages; B joined after {joined_at} handled, left after {left_at}; "
        f"A handled {len(a_worker.handled)}, B handled {len(b_worker.handled)}; duplicates: {duplicates}"
    )
    assert set(counts) == {m.id for m in sent}, "a message was lost"
    # two rebalances, each can at most redeliver what was in flight in one member
    assert duplicates <= 2 * PREFETCH
