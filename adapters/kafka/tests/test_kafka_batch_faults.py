"""Batch handlers on Kafka under faults: rebalances, a restart, transient failures, the breaker.

Every scenario runs a real :class:`~meshlink.Mesh` with a batch handler
(``KafkaTransport.subscribe_batch``, :mod:`meshlink_kafka.batch_consumer`) against the
Kafka-protocol broker. Faults are triggered on progress (so many handled), and every wait
is on a condition; timeouts only guard against hangs.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from kafka_helpers import Progress, committed_offsets, transport, unique
from pydantic import BaseModel

from meshlink import Batch, BatchContext, Breaker, BreakerStateChanged, FakeClock, Mesh, Retry
from meshlink.events import Event, MessageDeadLettered, MessageGivenBack
from meshlink.message import Message
from meshlink.transport.base import Delivery, Outgoing, Settlement, SubscriptionSpec, Transport
from meshlink_kafka.progress import LEDGER


class Item(BaseModel):
    key: str
    seq: int


@dataclass
class Done:
    """One message handled by a batch handler (in the order handlers finished)."""

    id: str
    key: str
    seq: int
    partition: int
    offset: int
    member: str


def items(count: int, keys: int) -> list[Message]:
    """``count`` messages round-robin over ``keys`` keys, ``seq`` counting per key."""
    seq: dict[str, int] = defaultdict(int)
    out = []
    for i in range(count):
        key = f"k{i % keys}"
        body = Item(key=key, seq=seq[key]).model_dump_json().encode()
        out.append(Message(body=body, type="Item", key=key))
        seq[key] += 1
    return out


async def publish(t: Transport, topic: str, messages: list[Message], chunk: int = 250) -> None:
    for i in range(0, len(messages), chunk):
        await t.publish_many([Outgoing(destination=topic, message=m) for m in messages[i : i + chunk]])


def options(ns: str, partitions: int) -> dict[str, Any]:
    # delay topics and relay group per test: a fresh relay group each time (see the conformance suite)
    return {"partitions": partitions, "delay_topic_prefix": f"{ns}.delay", "delay_group": f"{ns}.delay"}


#: every batch a recorder received: (member, [(partition, offset), ...])
Shape = list[tuple[str, list[tuple[int, int]]]]


def recorder(
    done: list[Done],
    member: str,
    progress: Progress,
    rng: random.Random | None = None,
    max_delay: float = 0.0,
    shapes: Shape | None = None,
) -> Callable[..., Any]:
    """A batch handler body: small random work, then record each message of the batch."""

    async def handle(batch: list[Item], ctx: BatchContext) -> None:
        locs = [(int(d.location["partition"]), int(d.location["offset"])) for d in ctx.deliveries]
        if shapes is not None:
            shapes.append((member, locs))
        if rng is not None:
            await asyncio.sleep(rng.random() * max_delay)
        for x, d, (partition, offset) in zip(batch, ctx.deliveries, locs, strict=True):
            done.append(Done(d.message.id, x.key, x.seq, partition, offset, member))
        progress.poke()

    return handle


def shape_violations(shapes: Shape, max_size: int) -> list[str]:
    """A native Kafka batch: 1..max_size records of one partition, in offset order."""
    bad = []
    for member, locs in shapes:
        partitions = {p for p, _ in locs}
        offsets = [o for _, o in locs]
        if not 1 <= len(locs) <= max_size or len(partitions) != 1 or offsets != sorted(set(offsets)):
            bad.append(f"{member}: {locs[:5]}... ({len(locs)} records)")
    return bad


def order_violations(done: list[Done]) -> list[str]:
    """Per member and key, handled seqs must not go back, except for a message handled before
    (a re-handled duplicate after a rebalance or restart)."""
    seen: set[str] = set()
    top: dict[tuple[str, str], int] = {}
    bad = []
    for h in done:
        mk = (h.member, h.key)
        if mk in top and h.seq < top[mk] and h.id not in seen:
            bad.append(f"{h.member}: key {h.key} seq {h.seq} after {top[mk]} (first handling)")
        top[mk] = max(top.get(mk, -1), h.seq)
        seen.add(h.id)
    return bad


def first_handlings_in_order(done: list[Done]) -> list[str]:
    """The first handling of each message, per key, follows the produced order."""
    seen: set[str] = set()
    per_key: dict[str, list[int]] = defaultdict(list)
    for h in done:
        if h.id not in seen:
            seen.add(h.id)
            per_key[h.key].append(h.seq)
    return [f"key {k}: {seqs[:20]}..." for k, seqs in per_key.items() if seqs != list(range(len(seqs)))]


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


# -- 3. the first try of each batch fails ------------------------------------------------------

RETRY_MESSAGES = 1_200


async def test_batch_handler_failing_each_first_try_goes_on_and_handles_everything_once(
    kafka_bootstrap: str,
) -> None:
    ns = unique("batchretry")
    topic, group = f"{ns}.orders", "batchers"
    opts = options(ns, 3)
    progress = Progress()
    done: list[Done] = []
    tries: list[tuple[int, list[str]]] = []
    dead: list[MessageDeadLettered] = []
    m = Mesh(transport(kafka_bootstrap, **opts), service="batchretry")
    inner = recorder(done, "m", progress)

    @m.handler(
        topic,
        group=group,
        batch=Batch(max_size=20, max_wait=0.01),
        concurrency=3,
        retry=Retry(attempts=2, backoff=0.01, max_backoff=0.01, jitter=0, redeliver=()),
    )
    async def store(batch: list[Item], ctx: BatchContext) -> None:
        tries.append((ctx.attempt, [msg.id for msg in ctx.messages]))
        if ctx.attempt == 1:
            raise RuntimeError("database hiccup on the first try")
        await inner(batch, ctx)

    def listen(e: Event) -> None:
        if isinstance(e, MessageDeadLettered):
            dead.append(e)
            progress.poke()

    m.add_listener(listen)
    producer = transport(kafka_bootstrap, **opts)
    await producer.connect()
    sent = items(RETRY_MESSAGES, 30)
    everything = {x.id for x in sent}
    try:
        await producer.declare(topic, group)
        await m.start()
        await publish(producer, topic, sent)
        await progress.until(lambda: {h.id for h in done} | {e.message.id for e in dead} >= everything, 30)
    finally:
        await m.stop(drain_timeout=0)
        await producer.close()

    counts = Counter(h.id for h in done)
    print(f"\nbatch retry: {RETRY_MESSAGES} messages in {len(tries)} tries; dead-lettered: {len(dead)}")
    assert not dead, f"{len(dead)} messages dead-lettered: {[e.reason for e in dead[:3]]}"
    assert set(counts) == everything, "a message was lost"
    assert max(counts.values()) == 1, f"handled twice: {[i for i, n in counts.items() if n > 1][:5]}"
    failed = sorted(ids for attempt, ids in tries if attempt == 1)
    retried = sorted(ids for attempt, ids in tries if attempt == 2)
    assert failed == retried, "each retry ran exactly the batch that failed"
    assert all(attempt in (1, 2) for attempt, _ in tries)
    bad = order_violations(done)
    assert not bad, f"per-key order broken: {bad[:10]}"


# -- 4. the breaker pauses a batch subscription --------------------------------------------------

BREAKER_FIRST = 300
BREAKER_WHILE_OPEN = 300


async def test_batch_handler_breaker_pauses_while_open_and_a_good_trial_closes_it(
    kafka_bootstrap: str,
) -> None:
    ns = unique("batchbreaker")
    topic, group = f"{ns}.orders", "batchers"
    opts = options(ns, 3)
    progress = Progress()
    clock = FakeClock()
    failing = True
    calls: list[tuple[str, list[str]]] = []  # (breaker state at entry, message ids)
    done: list[Done] = []
    dead: list[MessageDeadLettered] = []
    states: list[str] = []
    given_back: list[MessageGivenBack] = []
    m = Mesh(transport(kafka_bootstrap, **opts), service="batchbreaker", clock=clock)
    inner = recorder(done, "m", progress)

    @m.handler(
        topic,
        group=group,
        batch=Batch(max_size=10, max_wait=0.01),
        concurrency=2,
        breaker=Breaker(failures=3, reset="30s"),
        retry=Retry.none(),
    )
    async def store(batch: list[Item], ctx: BatchContext) -> None:
        breaker = m.breakers["store"]
        calls.append((breaker.state, [msg.id for msg in ctx.messages]))
        progress.poke()
        if failing:
            raise RuntimeError("dependency down")
        await inner(batch, ctx)

    def listen(e: Event) -> None:
        if isinstance(e, BreakerStateChanged):
            states.append(e.state)
        elif isinstance(e, MessageDeadLettered):
            dead.append(e)
        elif isinstance(e, MessageGivenBack):
            given_back.append(e)
        progress.poke()

    m.add_listener(listen)
    producer = transport(kafka_bootstrap, **opts)
    witness = transport(kafka_bootstrap, **opts)  # another group: shows the records are there to fetch
    seen_by_witness: set[str] = set()

    async def witness_cb(d: Delivery) -> None:
        seen_by_witness.add(d.message.id)
        await d.ack()
        progress.poke()

    for t in (producer, witness):
        await t.connect()
    first, later = items(BREAKER_FIRST, 20), items(BREAKER_WHILE_OPEN, 20)
    everything = {x.id for x in first + later}
    try:
        await producer.declare(topic, group)
        await witness.subscribe(SubscriptionSpec(destination=topic, group="witness", prefetch=64), witness_cb)
        await m.start()
        subscriptions = m.dispatchers[0].subscriptions
        await publish(producer, topic, first)
        await progress.until(lambda: "open" in states, timeout=30)
        # the breaker pauses the subscriptions from its own task, just after it says "open"
        async with asyncio.timeout(10):
            while not all(s.paused for s in subscriptions):  # noqa: ASYNC110 - no event reports the pause
                await asyncio.sleep(0)
        calls_when_open, given_back_when_open = len(calls), len(given_back)
        # more records arrive while open: another group fetches them all, this one takes none
        await publish(producer, topic, later)
        await progress.until(lambda: seen_by_witness >= everything, timeout=30)
        calls_while_open = len(calls) - calls_when_open
        given_back_while_open = len(given_back) - given_back_when_open
        in_flight = m.in_flight
        failing = False
        await clock.wait_for_sleepers(1)  # the breaker's reset timer
        await clock.advance(30)
        await progress.until(lambda: "closed" in states, timeout=30)
        await progress.until(lambda: {h.id for h in done} | {e.message.id for e in dead} >= everything, 30)
    finally:
        await m.stop(drain_timeout=0)
        for t in (witness, producer):
            await t.close()

    trial_calls = sum(1 for st, _ in calls if st == "half-open")
    print(
        f"\nbatch breaker: states {states}; {len(calls)} calls, {calls_when_open} before open, "
        f"{calls_while_open} while open, {given_back_while_open} messages given back while open "
        f"({len(given_back)} in all); {trial_calls} trial calls; in flight when reset: {in_flight}; "
        f"dead-lettered {len(dead)}, handled {len(done)}"
    )
    assert states[:3] == ["open", "half-open", "closed"], states
    assert calls_while_open == 0, "a batch ran while the circuit was open"
    # a batch handed out between "open" and the pause (the breaker pauses from its own task) is
    # given back at the gate; nothing published after the pause is handed out while open
    window = given_back[given_back_when_open : given_back_when_open + given_back_while_open]
    back_while_open = {e.message.id for e in window}
    assert not back_while_open & {x.id for x in later}, "records were handed out while the circuit was open"
    assert given_back_while_open <= 2 * 10, "more given back than one hand-out's worth of batches"
    trials = [ids for state, ids in calls if state == "half-open"]
    assert len(trials) == 1, f"half-open lets exactly one trial batch through, {len(trials)} ran"
    assert all(state != "open" for state, _ in calls), "the handler was called with the circuit open"
    dead_ids = Counter(e.message.id for e in dead)
    handled = Counter(h.id for h in done)
    assert max(dead_ids.values(), default=1) == 1, "dead-lettered twice"
    assert max(handled.values(), default=1) == 1, "handled twice"
    assert not set(dead_ids) & set(handled), "both dead-lettered and handled"
    assert set(dead_ids) | set(handled) == everything, "a message was lost"
    # only batches that ran while failing were dead-lettered: one call each, then the circuit opened
    failed_ids = {i for _, ids in calls[:calls_when_open] for i in ids}
    assert set(dead_ids) == failed_ids, "dead-lettered exactly the batches that failed"
    # 3 failures open it; batches already past the gate (concurrency 2) may still fail
    assert 3 <= calls_when_open <= 3 + 2, f"the circuit opens after 3 failed batches, {calls_when_open} ran"
