"""The broker cancels our consumer (``basic.cancel``): the subscription comes back.

An operator deleting a group queue from another connection makes RabbitMQ cancel
its consumers; aio-pika does not recover from that (aio-pika #334). Faults are
triggered on progress (a delivery held, a recovery parked in its backoff);
timeouts are hang guards only.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest
from rabbit_helpers import GUARD, Collect, Operator, name, until

from meshlink.message import Message
from meshlink.transport.base import SubscriptionSpec
from meshlink_rabbitmq import ConsumerRecovery, RabbitSubscription, RabbitTransport

pytestmark = pytest.mark.rabbitmq


class Gate:
    """A ``sleep`` for :class:`ConsumerRecovery` that parks the recovery until the test opens it."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self.parked = asyncio.Event()
        self._open = asyncio.Event()

    async def __call__(self, delay: float) -> None:
        self.waits.append(delay)
        self.parked.set()
        await self._open.wait()

    def open(self) -> None:
        self._open.set()


@pytest.fixture
async def operator(rabbit_url: str) -> AsyncIterator[Operator]:
    conn = await aio_pika.connect(rabbit_url)
    try:
        yield Operator(conn)
    finally:
        await conn.close()


async def recovery_parked(t: RabbitTransport, operator: Operator, dest: str, gate: Gate) -> None:
    """Lose the group queue so that the first recovery attempt fails and parks in its backoff.

    The exchange goes first: binding the re-declared queue then fails (``NOT_FOUND``),
    and aio-pika's restore of the topology channel declares the exchange again.
    """
    await operator.delete_exchange(dest)
    await operator.delete_queue(f"{dest}.g")
    async with asyncio.timeout(GUARD):
        await gate.parked.wait()
    assert gate.waits == [t.consumer_recovery.first_delay]


async def test_a_deleted_group_queue_is_declared_again_and_consumed(cleanup: Any, operator: Operator) -> None:
    t = cleanup.transport()
    await t.connect()
    dest = name("cancel")
    queue = f"{dest}.g"
    rec = Collect(hold=1)
    sub = await t.subscribe(SubscriptionSpec(destination=dest, group="g"), rec)
    await t.publish(dest, Message(body=b"before"))
    await rec.wait(1)  # held unsettled across the cancel
    old_tag = sub.consumer_tag

    await operator.delete_queue(queue)
    await until(lambda: _consumed(operator, queue))

    await rec.got[0].ack()  # from the cancelled consumer: settled without harm
    after = Message(body=b"after")
    await t.publish(dest, after)  # routable again: the queue is bound
    await rec.wait(2)
    assert rec.got[1].message.id == after.id
    assert sub.consumer_tag not in (None, old_tag)
    assert isinstance(sub, RabbitSubscription)
    assert (sub.consumer_losses, sub.recoveries) == (1, 1)


async def _consumed(operator: Operator, queue: str) -> bool:
    state = await operator.queue_state(queue)
    return state is not None and state[1] == 1


async def test_a_subscription_paused_during_the_recovery_is_declared_again_but_stays_paused(
    cleanup: Any, operator: Operator
) -> None:
    gate = Gate()
    t = cleanup.transport(consumer_recovery=ConsumerRecovery(sleep=gate))
    await t.connect()
    dest = name("cancel-paused")
    queue = f"{dest}.g"
    rec = Collect()
    sub = await t.subscribe(SubscriptionSpec(destination=dest, group="g"), rec)
    assert isinstance(sub, RabbitSubscription)
    await recovery_parked(t, operator, dest, gate)

    await sub.pause()
    gate.open()
    await until(lambda: sub.recoveries == 1)
    assert sub.paused
    assert sub.consumer_tag is None
    assert await operator.queue_state(queue) == (0, 0)  # declared again, nobody consuming

    sent = Message(body=b"while paused")
    await t.publish(dest, sent)  # bound again: routable, and kept for the group
    assert await operator.queue_state(queue) == (1, 0)
    assert rec.got == []

    await sub.resume()
    await rec.wait(1)
    assert [d.message.id for d in rec.got] == [sent.id]


@pytest.mark.parametrize("how", ["stop", "close"])
async def test_stop_or_close_during_the_recovery_backoff_leaves_no_task_and_no_consumer(
    cleanup: Any, operator: Operator, how: str
) -> None:
    gate = Gate()
    t = cleanup.transport(consumer_recovery=ConsumerRecovery(sleep=gate))
    await t.connect()
    dest = name("cancel-stop")
    queue = f"{dest}.g"
    rec = Collect(hold=1)
    sub = await t.subscribe(SubscriptionSpec(destination=dest, group="g"), rec)
    assert isinstance(sub, RabbitSubscription)
    await t.publish(dest, Message(body=b"held"))
    await rec.wait(1)  # unsettled: a stop() alone keeps the channel open for it
    await recovery_parked(t, operator, dest, gate)
    assert sub.recovering
    recovery = sub._recovery
    assert recovery is not None

    if how == "stop":
        await sub.stop()
    else:
        await t.close()
    assert recovery.done()
    assert not sub.recovering
    gate.open()  # harmless now: nothing is parked behind it any more
    assert sub.consumer_tag is None
    assert sub.recoveries == 0

    # Declare the queue as the transport would, then look: nobody consumes it.
    async with operator.connection.channel() as ch:
        await ch.declare_exchange(dest, "topic", durable=True)
        q = await ch.declare_queue(queue, durable=True)
        await q.bind(dest, "#")
    assert await operator.queue_state(queue) == (0, 0)
    await rec.got[0].ack()  # settling after the stop is still safe
