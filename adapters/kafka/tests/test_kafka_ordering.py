"""Per-key order under concurrency, and a consumer restarted mid-stream."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest
from kafka_helpers import Progress, Worker, committed_offsets, keyed_messages, publish_all, transport, unique

from meshlink.transport.base import SubscriptionSpec
from meshlink_kafka.progress import LEDGER

MESSAGES = 20_000
KEYS = 200
PARTITIONS = 6
CONCURRENCY = 32
RESTART_AFTER = 8_000


@pytest.mark.parametrize("restart", ["same_process", "other_process"])
async def test_per_key_order_holds_with_concurrency_and_a_restart_loses_nothing(
    kafka_bootstrap: str, restart: str
) -> None:
    """``other_process`` forgets this process's ledger of finished offsets, as a new process on a
    broker without commit metadata would: then re-handling is bounded by the last commit."""
    topic, group = unique("ordering"), "orders"
    opts = {"partitions": PARTITIONS, "commit_interval": 0.5}
    producer = transport(kafka_bootstrap, **opts)
    await producer.connect()
    progress = Progress()
    worker = Worker(on_progress=progress.poke)
    spec = SubscriptionSpec(destination=topic, group=group, prefetch=CONCURRENCY)
    try:
        await producer.declare(topic, group)
        sent = keyed_messages(MESSAGES, KEYS)
        first = transport(kafka_bootstrap, **opts)
        await first.connect()
        await first.subscribe(spec, worker)
        publishing = asyncio.create_task(publish_all(producer, topic, sent))

        # stop the first consumer mid-stream, on progress: handlers in flight are lost (crash),
        # the transport commits what finished and returns the rest
        await progress.until(lambda: len(worker.handled) >= RESTART_AFTER, timeout=120)
        await worker.crash_handlers()
        await first.close()
        before_restart = len(worker.handled)
        group_id = first.settings.group_id(topic, group)
        committed = await committed_offsets(kafka_bootstrap, group_id, topic, PARTITIONS)

        if restart == "other_process":
            LEDGER.clear()
        worker.run = 1
        second = transport(kafka_bootstrap, **opts)
        await second.connect()
        try:
            await second.subscribe(spec, worker)
            await publishing
            await progress.until(lambda: len({h.id for h in worker.handled}) >= MESSAGES, timeout=180)
            await worker.crash_handlers()
        finally:
            await second.close()
    finally:
        await producer.close()

    # nothing lost
    assert {h.id for h in worker.handled} == {m.id for m in sent}
    # re-handled only after the last commit of the first consumer
    seen: set[str] = set()
    rehandled = []
    for h in worker.handled:
        if h.id in seen:
            rehandled.append(h)
        seen.add(h.id)
    assert all(h.run == 1 and h.offset >= committed[h.partition] for h in rehandled)
    # per key: handled order == produced order, in each run
    for run in (0, 1):
        per_key: dict[str, list[int]] = defaultdict(list)
        for h in worker.handled:
            if h.run == run:
                per_key[h.key].append(h.seq)
        for key, seqs in per_key.items():
            assert seqs == sorted(seqs), f"key {key} out of order in run {run}"
            assert len(seqs) == len(set(seqs)), f"key {key} handled twice in run {run}"
    first_seen: dict[str, list[int]] = defaultdict(list)
    done: set[str] = set()
    for h in worker.handled:
        if h.id not in done:
            done.add(h.id)
            first_seen[h.key].append(h.seq)
    for key, seqs in first_seen.items():
        assert seqs == list(range(len(seqs))), f"key {key}: first handlings out of produced order"
    print(
        f"\nordering ({restart}): {MESSAGES} messages, {KEYS} keys, {PARTITIONS} partitions, "
        f"concurrency {CONCURRENCY}; "
        f"restart after {before_restart} handled; re-handled after restart: {len(rehandled)}"
    )
