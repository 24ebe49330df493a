"""Batch handlers on Kafka under membership faults: a member joining and leaving mid-stream,
a stop and restart. (Failures and the breaker: ``test_kafka_batch_policies.py``.)

Every scenario runs a real :class:`~meshlink.Mesh` with a batch handler
(``KafkaTransport.subscribe_batch``, :mod:`meshlink_kafka.batch_consumer`) against the
Kafka-protocol broker. Faults are triggered on progress (so many handled), and every wait
is on a condition; timeouts only guard against hangs.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest
from batch_helpers import (
    Done,
    Item,
    Shape,
    first_handlings_in_order,
    items,
    options,
    order_violations,
    publish,
    recorder,
    shape_violations,
)
from kafka_helpers import Progress, committed_offsets, transport, unique

from meshlink import Batch, BatchContext, Mesh
from meshlink.transport.base import Delivery, Settlement
from meshlink_kafka.progress import LEDGER

# -- 1. a member joins and leaves mid-stream -----------------------------------------------

REBALANCE_MESSAGES = 5_000
REBALANCE_BATCH = 20
REBALANCE_CONCURRENCY = 4


def draining(mesh: Mesh) -> bool:
    """Whether the mesh's main subscription is releasing partitions (a rebalance began)."""
    sub = mesh.dispatchers[0].subscriptions[0]
    return any(p.draining for p in sub._parts.values())  # type: ignore[attr-defined]


@pytest.mark.parametrize("held", ["within_drain", pytest.param("past_drain", marks=pytest.mark.chaos)])
async def test_batch_handler_member_joining_and_leaving_mid_stream_loses_nothing(
    kafka_bootstrap: str, held: str
) -> None:
    """When B joins, A has batches in flight (held in the handler): ``within_drain`` lets them
    finish once A's revocation began (inside ``drain_timeout``: no duplicates expected);
    ``past_drain`` holds them until B has its share (A released them unsettled: B handles
    them again, and A finishes its copies late)."""
    ns = unique("batchreb")
    topic, group = f"{ns}.orders", "batchers"
    opts = options(ns, 6)
    progress = Progress()
    done: list[Done] = []
    batch = Batch(max_size=REBALANCE_BATCH, max_wait=0.01)
    gate = asyncio.Event()
    gate.set()
    held_batches: list[int] = []
    shapes: Shape = []

    def mesh(member: str, seed: int) -> Mesh:
        m = Mesh(transport(kafka_bootstrap, **opts), service="batchreb")
        inner = recorder(done, member, progress, random.Random(seed), max_delay=0.004, shapes=shapes)

        async def store(batch: list[Item], ctx: BatchContext) -> None:
            if member == "A" and not gate.is_set():
                held_batches.append(len(batch))
                progress.poke()
                await gate.wait()
            await inner(batch, ctx)

        m.handler(topic, group=group, batch=batch, concurrency=REBALANCE_CONCURRENCY)(store)
        return m

    producer = transport(kafka_bootstrap, **opts)
    await producer.connect()
    a, b = mesh("A", 1), mesh("B", 2)
    sent = items(REBALANCE_MESSAGES, 50)
    first_part, second_part = 2 * REBALANCE_MESSAGES // 5, 7 * REBALANCE_MESSAGES // 10
    b_joined, b_left = asyncio.Event(), asyncio.Event()

    async def publisher() -> None:
        # the stream goes on across both membership changes
        await publish(producer, topic, sent[:first_part])
        await b_joined.wait()
        await publish(producer, topic, sent[first_part:second_part])
        await b_left.wait()
        await publish(producer, topic, sent[second_part:])

    def handled_by(member: str) -> int:
        return sum(1 for h in done if h.member == member)

    everything = {m.id for m in sent}
    try:
        await producer.declare(topic, group)
        await a.start()
        publishing = asyncio.create_task(publisher())
        await progress.until(lambda: len(done) >= 800, timeout=30)
        gate.clear()  # A's next batches wait in the handler: in flight when B joins
        await progress.until(lambda: len(held_batches) >= 2, timeout=30)
        joining = asyncio.create_task(b.start())  # returns once the rebalance assigned B its share
        async with asyncio.timeout(30):
            while not draining(a):  # noqa: ASYNC110 - no event reports the revocation
                await asyncio.sleep(0.005)
        if held == "past_drain":
            async with asyncio.timeout(30):
                await joining
        gate.set()
        async with asyncio.timeout(30):
            await joining
        joined_at, b_before = len(done), handled_by("B")
        b_joined.set()
        # B leaves while its share of the next part is being handled
        await progress.until(lambda: handled_by("B") >= b_before + 150, timeout=30)
        b_in_flight = b.in_flight
        await b.stop(drain_timeout=10)  # graceful: running batches finish and are acked, B leaves
        left_at = len(done)
        b_left.set()
        async with asyncio.timeout(30):
            await publishing
        await progress.until(lambda: {h.id for h in done} >= everything, timeout=30)
    finally:
        gate.set()
        await b.stop(drain_timeout=0)
        await a.stop(drain_timeout=0)
        await producer.close()

    counts = Counter(h.id for h in done)
    duplicates = sum(n - 1 for n in counts.values())
    print(
        f"\nbatch rebalance ({held}): {REBALANCE_MESSAGES} messages; A held {len(held_batches)} batches "
        f"({sum(held_batches)} messages) when B joined; B joined after {joined_at} handled, "
        f"left after {left_at} with {b_in_flight} batches running; "
        f"A handled {handled_by('A')}, B handled {handled_by('B')}; "
        f"duplicates: {duplicates}"
    )
    assert set(counts) == everything, "a message was lost"
    bad = shape_violations(shapes, REBALANCE_BATCH)
    assert not bad, f"not one partition's run in offset order: {bad[:5]}"
    bad = order_violations(done)
    assert not bad, f"per-key order broken within a member: {bad[:10]}"
    if held == "within_drain":
        bad = first_handlings_in_order(done)
        assert not bad, f"first handlings out of produced order: {bad[:10]}"
        assert duplicates == 0, "in-flight batches finished within the drain: nothing handled twice"
    else:
        # A released what it held unsettled; B had the rest of A's prefetch too
        assert duplicates <= REBALANCE_BATCH * REBALANCE_CONCURRENCY


# -- 2. stop mid-stream, start again ----------------------------------------------------------

RESTART_MESSAGES = 4_000
RESTART_PARTITIONS = 6
RESTART_BATCH = 25
RESTART_CONCURRENCY = 4


@pytest.mark.parametrize(
    ("restart", "stop"),
    [
        pytest.param("same_process", "graceful", marks=pytest.mark.chaos),
        pytest.param("other_process", "graceful", marks=pytest.mark.chaos),
        ("other_process", "deadline"),
    ],
)
async def test_batch_handler_stopped_mid_stream_and_restarted_rehandles_only_unacked(
    kafka_bootstrap: str, restart: str, stop: str
) -> None:
    """``other_process`` forgets this process's ledger of finished offsets, as a new process
    would: then only the commit made when the first mesh stopped counts. ``graceful`` lets the
    running batches finish; ``deadline`` stops with batches held in the handler and no drain
    time (they are cancelled and given back, unacked)."""
    ns = unique("batchrestart")
    topic, group = f"{ns}.orders", "batchers"
    opts = options(ns, RESTART_PARTITIONS)
    progress = Progress()
    done: list[Done] = []
    given: list[Delivery] = []  # every delivery the first mesh's handler received
    batch = Batch(max_size=RESTART_BATCH, max_wait=0.01)
    gate = asyncio.Event()
    gate.set()
    held: list[int] = []

    def mesh(member: str, seed: int) -> Mesh:
        m = Mesh(transport(kafka_bootstrap, **opts), service="batchrestart")
        inner = recorder(done, member, progress, random.Random(seed), max_delay=0.004)

        async def store(batch: list[Item], ctx: BatchContext) -> None:
            if member == "first":
                given.extend(ctx.deliveries)
                if not gate.is_set():
                    held.append(len(batch))
                    progress.poke()
                    await gate.wait()
            await inner(batch, ctx)

        m.handler(topic, group=group, batch=batch, concurrency=RESTART_CONCURRENCY)(store)
        return m

    producer = transport(kafka_bootstrap, **opts)
    await producer.connect()
    first, second = mesh("first", 1), mesh("second", 2)
    sent = items(RESTART_MESSAGES, 100)
    everything = {m.id for m in sent}
    try:
        await producer.declare(topic, group)
        await first.start()
        group_id = first.transport.settings.group_id(topic, group)  # type: ignore[attr-defined]
        publishing = asyncio.create_task(publish(producer, topic, sent))
        await progress.until(lambda: len(done) >= RESTART_MESSAGES // 2, timeout=30)
        if stop == "deadline":
            gate.clear()
            await progress.until(lambda: len(held) >= 2, timeout=30)
        in_flight = first.in_flight
        await first.stop(drain_timeout=10 if stop == "graceful" else 0)
        gate.set()
        stopped_at = len(done)
        acked = {d.message.id for d in given if d.settled == Settlement.ACK}
        unacked = {d.message.id for d in given} - acked
        committed = await committed_offsets(kafka_bootstrap, group_id, topic, RESTART_PARTITIONS)
        if restart == "other_process":
            LEDGER.clear()
        await second.start()
        async with asyncio.timeout(30):
            await publishing
        await progress.until(lambda: {h.id for h in done} >= everything, timeout=30)
    finally:
        gate.set()
        await second.stop(drain_timeout=0)
        await first.stop(drain_timeout=0)
        await producer.close()

    counts = Counter(h.id for h in done)
    handled_first = {h.id for h in done[:stopped_at]}
    given_first = {d.message.id for d in given}
    rehandled = [h for h in done[stopped_at:] if h.id in given_first]
    print(
        f"\nbatch restart ({restart}, {stop}): {RESTART_MESSAGES} messages; stopped after {stopped_at} "
        f"handled with {in_flight} batches running ({len(acked)} acked, {len(unacked)} given back); "
        f"committed {committed}; re-handled after restart: {len(rehandled)}"
    )
    assert set(counts) == everything, "a message was lost"
    assert handled_first <= acked, "every batch the first mesh finished was acked"
    wrongly = [h for h in rehandled if h.id in acked]
    assert not wrongly, (
        f"{len(wrongly)} messages acked before the stop were handled again after the restart, e.g. "
        f"{[(h.partition, h.offset) for h in wrongly[:10]]}"
    )
    assert {h.id for h in rehandled} <= unacked
    assert len(rehandled) <= RESTART_BATCH * RESTART_CONCURRENCY, "more re-handled than batches in flight"
    if stop == "deadline":
        assert {h.id for h in rehandled} == unacked, "what was given back is handled after the restart"
    bad = order_violations(done)
    assert not bad, f"per-key order broken: {bad[:10]}"
    bad = first_handlings_in_order(done)
    assert not bad, f"first handlings out of produced order: {bad[:10]}"
