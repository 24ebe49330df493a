"""Batch handlers on Kafka under their policies: a failing first try per batch, the breaker.

Real :class:`~meshlink.Mesh` objects against the Kafka-protocol broker; waits are on
conditions, timeouts only guard against hangs (helpers in ``batch_helpers.py``).
"""

from __future__ import annotations

import asyncio
from collections import Counter

from batch_helpers import (
    Done,
    Item,
    items,
    options,
    order_violations,
    publish,
    recorder,
)
from kafka_helpers import Progress, transport, unique

from meshlink import Batch, BatchContext, Breaker, BreakerStateChanged, FakeClock, Mesh, Retry
from meshlink.events import Event, MessageDeadLettered, MessageGivenBack
from meshlink.transport.base import Delivery, SubscriptionSpec

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
