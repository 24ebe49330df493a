"""Batch handler settlement faults found in a second review (memory transport, core): first
failure times in a failed batch, a transport closed under its collectors, a drain during a
dead-letter, a nack inside a held key's run. Each test failed before its fix; its docstring
says why."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from pydantic import BaseModel

from meshlink import Batch, Mesh, Message, Retry
from meshlink.events import MessageDeadLettered, RedeliveryScheduled
from meshlink.resilience.deadletter import FIRST_FAILED_AT
from meshlink.resilience.retry import iso
from meshlink.transport.base import Delivery, SubscriptionSpec
from meshlink.transport.batching import BatchLimits
from meshlink.transport.memory import MemoryTransport
from waiting import until


def url() -> str:
    return f"memory://{uuid.uuid4().hex}"


# -- recoverability of a failed batch ------------------------------------------------------------


async def test_a_fresh_message_does_not_inherit_the_first_failure_time_of_its_batch_neighbour() -> None:
    """A failed batch settles each message "on its own budget". The first failure time is part
    of that budget (``Retry.max_elapsed``) and of the redelivered/dead-lettered headers. As
    reviewed, ``_batch_failed`` passes ``ctx.first_failed_at`` (which the retry layer read from
    the batch's *first* message's ``first-failed-at`` header) as the default of every other
    message: a message failing for the first time gets its neighbour's two-hour-old first
    failure, and ``max_elapsed="1h"`` dead-letters it on its first failure."""
    mesh = Mesh(url(), service="s")
    calls: list[int] = []

    @mesh.handler(
        "mixed",
        batch=Batch(max_size=2, max_wait=3600),
        retry=Retry(attempts=2, backoff=0, jitter=0, redeliver=("1h",), max_elapsed="1h"),
    )
    async def store(items: list[dict[str, Any]]) -> None:
        calls.append(len(items))
        raise RuntimeError("db down")

    dead: list[str] = []
    redelivered: list[str] = []

    def listen(e: object) -> None:
        if isinstance(e, MessageDeadLettered):
            dead.append(e.message.id)
        elif isinstance(e, RedeliveryScheduled):
            redelivered.append(e.message.id)

    mesh.add_listener(listen)
    async with mesh:
        old = mesh.message({"n": 0}).with_headers({FIRST_FAILED_AT: iso(time.time() - 7200)})
        fresh = mesh.message({"n": 1})
        await mesh.publish("mixed", old)
        await mesh.publish("mixed", fresh)
        await until(lambda: len(dead) + len(redelivered) >= 2, "both messages settled")
    assert calls, "the batch handler ran"
    assert calls[0] == 2, f"one batch of both expected, got {calls}"
    assert old.id in dead, "the old message is past max_elapsed"
    assert fresh.id in redelivered, f"not redelivered: {redelivered}"
    assert fresh.id not in dead, (
        f"the fresh message failed once, within max_elapsed, yet was dead-lettered "
        f"(dead={dead}, redelivered={redelivered})"
    )


# -- transport close --------------------------------------------------------------------------------


async def test_closing_the_memory_transport_stops_its_batch_collectors() -> None:
    """``Transport.close`` "stops every subscription, returns unsettled deliveries". As reviewed,
    MemoryTransport.close detaches the inner per-delivery subscriptions only: the collector of a
    batch subscription keeps its gathered deliveries and its timer, and once the timer is due
    hands them to ``on_batch`` — after the transport closed and after the broker took them back
    and gave them to another consumer of the group (so they are handled twice)."""
    name = url()
    a = MemoryTransport(name)
    b = MemoryTransport(name)
    await a.connect()
    await b.connect()
    got_a: list[str] = []
    got_b: list[str] = []

    def taker(into: list[str]) -> Callable[[Sequence[Delivery]], Any]:
        async def take(deliveries: Sequence[Delivery]) -> None:
            into.extend(d.message.id for d in deliveries)
            for d in deliveries:
                if d.settled is None:
                    with contextlib.suppress(Exception):
                        await d.ack()

        return take

    spec = SubscriptionSpec(destination="c", group="g", prefetch=10)
    await a.declare("c", "g")
    sub_a = await a.subscribe_batch(spec, taker(got_a), BatchLimits(max_size=10, max_wait=0.05))
    try:
        sent = Message(body=b"{}")
        await a.publish("c", sent)
        collector = sub_a.collector  # type: ignore[attr-defined]
        await until(lambda: len(collector._pending) == 1, "the delivery reached the collector")
        await a.close()
        # the broker took the gathered delivery back: a consumer of the same group gets it
        await b.subscribe_batch(spec, taker(got_b), BatchLimits(max_size=10, max_wait=0))
        await until(lambda: got_b == [sent.id], "the other consumer got the message")
        # let the closed transport's collector timer come due, if it is still armed
        timer = collector._timer
        if timer is not None:
            loop = asyncio.get_running_loop()
            due = loop.create_future()
            loop.call_at(timer.when() + 0.001, due.set_result, None)
            await due
        for task in list(collector._timed):
            await task
        assert got_a == [], f"a closed transport's batch subscription handed over {got_a}"
    finally:
        await a.close()
        await b.close()


# -- drain ----------------------------------------------------------------------------------------


class Line(BaseModel):
    n: int


@pytest.mark.parametrize("batch", [None, Batch(max_size=1, max_wait=0)], ids=["single", "batch"])
async def test_a_drain_lets_the_dead_lettering_of_an_undecodable_message_finish(batch: Batch | None) -> None:
    """A drain never cancels a task whose settlement has begun ("a message that finished is not
    delivered again"): the single-message dispatcher marks the task settling before it
    dead-letters a body it cannot decode. As reviewed, the batch dispatcher dead-letters an
    undecodable message of a batch (``_failed_one`` in the decode loop) without marking the
    batch settling: a drain past its deadline cancels the dead-letter publish halfway, and the
    message goes back to the broker to fail again (on a broker whose publish had landed, it is
    dead-lettered twice)."""
    mesh = Mesh(url(), service="s")
    if batch is None:

        @mesh.handler("bad", retry=Retry.none())
        async def one(line: Line) -> None: ...

    else:

        @mesh.handler("bad", batch=batch, retry=Retry.none())
        async def many(lines: list[Line]) -> None: ...

    entered = asyncio.Event()
    release = asyncio.Event()
    publish_cancelled: list[bool] = []
    async with mesh:
        transport = mesh.transport
        real_publish = transport.publish

        async def publish(destination: str, message: Message, *, delay: float | None = None) -> None:
            if destination.endswith(".dlq"):
                entered.set()
                try:
                    await release.wait()
                except asyncio.CancelledError:
                    publish_cancelled.append(True)
                    raise
            await real_publish(destination, message, delay=delay)

        transport.publish = publish  # type: ignore[method-assign]
        await transport.publish("bad", Message(body=b"{not json"))
        await entered.wait()
        dispatcher = mesh.dispatchers[0]
        loop = asyncio.get_running_loop()
        drain = loop.create_task(dispatcher.drain(loop.time()))
        for _ in range(50):  # loop turns, no wall time: drain's zero timeout and its cancel step
            await asyncio.sleep(0)
        release.set()
        cancelled = await drain
    assert not publish_cancelled, "the dead-letter publish of the undecodable message was cancelled by drain"
    assert cancelled == 0


# -- memory broker key holds ---------------------------------------------------------------------


async def test_a_nacked_message_of_a_held_key_comes_back_before_the_keys_later_messages() -> None:
    """memory://: "a message with key K is not handed out while an earlier message with key K is
    unsettled", and "a nacked message goes back to the head of its group queue"; a batch
    subscription "may take a key's following messages while it holds the key: it keeps them in
    order". As reviewed, it does not once one of them is nacked: the subscription holds k with
    m0 (being handled) and m1 (taken, not yet handed over); nacking m0 gives it back and the
    same subscription takes it again at once, behind m1 — m1 is handed over before m0's
    redelivery. (A per-delivery subscription hands over m0, m0, m1.)"""
    t = MemoryTransport(url())
    await t.connect()
    handed: list[str] = []

    async def take(deliveries: Sequence[Delivery]) -> None:
        for d in deliveries:
            handed.append(d.message.body.decode())
            if d.message.body == b"m0" and not d.redelivered:
                # m1 is taken by now (the subscription holds k): give m0 back
                await until(lambda: len(sub.inner.inbox) == 1, "m1 was taken")  # type: ignore[attr-defined]
                await d.nack(requeue=True)
            else:
                await d.ack()

    await t.declare("order", "g")
    for body in (b"m0", b"m1"):
        await t.publish("order", Message(body=body, key="k"))
    spec = SubscriptionSpec(destination="order", group="g", prefetch=10)
    sub = await t.subscribe_batch(spec, take, BatchLimits(max_size=1, max_wait=0))
    try:
        await until(lambda: len(handed) >= 3, f"three hand-overs (so far {handed})")
        assert handed == ["m0", "m0", "m1"], f"key k handed over out of order: {handed}"
    finally:
        await t.close()
