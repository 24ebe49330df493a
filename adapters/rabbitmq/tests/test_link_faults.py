"""RabbitMQ adapter under link faults (pause, stop, resume during an outage; slow confirms).

Each test but the delay one failed before its fix.

Faults are triggered on progress (link seen lost, link seen restored, a message
seen on the broker); timeouts are hang guards only.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import pytest
from rabbit_helpers import GUARD, Collect, Operator, name, until

from meshlink.message import Message
from meshlink.testing.proxy import ProxyMode, TCPProxy
from meshlink.transport.base import Delivery, SubscriptionSpec
from meshlink_rabbitmq import RabbitSubscription, RabbitTransport

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
async def broker(rabbit_url: str) -> AsyncIterator[Operator]:
    conn = await aio_pika.connect(rabbit_url)
    try:
        yield Operator(conn)
    finally:
        await conn.close()


@pytest.fixture
async def proxy(rabbit_url: str) -> AsyncIterator[TCPProxy]:
    parts = urlsplit(rabbit_url)
    async with TCPProxy(parts.hostname or "127.0.0.1", parts.port or 5672) as p:
        yield p


def via(proxy: TCPProxy) -> str:
    return f"amqp://guest:guest@127.0.0.1:{proxy.port}/"


async def link_down(proxy: TCPProxy, t: RabbitTransport, sub: RabbitSubscription) -> None:
    """Cut the link and keep it refused; return once the transport and the channel saw it."""
    lost = t.disconnects
    await proxy.cut(then=ProxyMode.REFUSE)
    await until(lambda: t.disconnects > lost and sub._channel.is_closed)


async def link_up(proxy: TCPProxy, t: RabbitTransport) -> None:
    """Accept again; return once aio-pika restored every channel (it does so before the
    reconnect callbacks, which count ``reconnects``)."""
    back = t.reconnects
    await proxy.restore()
    await until(lambda: t.reconnects > back)


# -- 1. pause() while the link is down: aio-pika restores the consumer anyway ----------------


async def test_pause_during_a_link_loss_leaves_no_consumer_after_the_reconnect(
    proxy: TCPProxy, cleanup: Any, broker: Operator
) -> None:
    """pause() skips ``queue.cancel`` when the channel is closed, so the tag stays in
    aio-pika's RobustQueue._consumers and is consumed again on reconnect: a zombie
    consumer on a paused subscription, which nacks (requeues) everything it gets."""
    t = cleanup.transport(via(proxy), reconnect_interval=0.1)
    await t.connect()
    dest = name("pause-down")
    queue = f"{dest}.g"
    rec = Collect()
    sub = await t.subscribe(SubscriptionSpec(destination=dest, group="g"), rec)
    assert isinstance(sub, RabbitSubscription)

    await link_down(proxy, t, sub)
    await sub.pause()
    await link_up(proxy, t)
    await sub._channel.ready()

    assert sub.paused
    assert await broker.queue_state(queue) == (0, 0), "a paused subscription has a consumer on the broker"


async def test_a_message_sent_while_paused_across_a_link_loss_arrives_once_not_redelivered(
    proxy: TCPProxy, cleanup: Any, broker: Operator
) -> None:
    """The zombie consumer left by a pause during the outage bounces what is published
    while paused (nack + requeue, over and over): after resume the message arrives
    flagged ``redelivered`` although it was never handed to anyone, and the queue has
    two consumers."""
    direct = cleanup.transport()
    await direct.connect()
    t = cleanup.transport(via(proxy), reconnect_interval=0.1)
    await t.connect()
    dest = name("pause-bounce")
    queue = f"{dest}.g"
    rec = Collect()
    sub = await t.subscribe(SubscriptionSpec(destination=dest, group="g"), rec)
    assert isinstance(sub, RabbitSubscription)

    await link_down(proxy, t, sub)
    await sub.pause()
    await link_up(proxy, t)
    await sub._channel.ready()

    sent = Message(body=b"while paused")
    await direct.publish(dest, sent)
    await sub.resume()
    await rec.wait(1)
    state = await broker.queue_state(queue)
    assert state is not None
    assert state[1] == 1, f"expected one consumer, broker has {state[1]}"
    assert rec.got[0].message.id == sent.id
    assert not rec.got[0].redelivered, "never handed over before, yet flagged redelivered (bounced)"


async def test_quorum_message_published_while_paused_across_a_link_loss_is_not_lost(
    proxy: TCPProxy, cleanup: Any, broker: Operator
) -> None:
    """The same zombie on a quorum queue with a delivery limit: it nacks the message
    until the broker drops it (x-delivery-limit), so a message published while the
    subscription is paused never arrives after resume(): lost."""
    direct = cleanup.transport()
    await direct.connect()
    t = cleanup.transport(via(proxy), reconnect_interval=0.1)
    await t.connect()
    dest = name("pause-quorum")
    rec = Collect()
    spec = SubscriptionSpec(
        destination=dest, group="g", options={"queue_type": "quorum", "delivery_limit": 1}
    )
    sub = await t.subscribe(spec, rec)
    assert isinstance(sub, RabbitSubscription)

    await link_down(proxy, t, sub)
    await sub.pause()
    await link_up(proxy, t)
    await sub._channel.ready()

    sent = Message(body=b"while paused")
    await direct.publish(dest, sent)
    await sub.resume()
    try:
        async with asyncio.timeout(10):  # hang guard: it arrives at once when it was kept
            await rec.wait(1)
    except TimeoutError:
        pytest.fail("the message published while paused was dropped by the broker (delivery limit): lost")
    assert rec.got[0].message.id == sent.id
    assert rec.got[0].delivery_count == 1, "bounced by a consumer nobody handed it to"


# -- 2. stop() while the link is down: the stopped subscription's channel comes back -------------


async def test_stop_during_a_link_loss_leaves_no_consumer_after_the_reconnect(
    proxy: TCPProxy, cleanup: Any, broker: Operator
) -> None:
    """stop() skips both ``queue.cancel`` and ``channel.close`` when the channel is closed
    (and marks itself closed), so aio-pika reopens the channel and re-consumes: a
    stopped subscription keeps a consumer on the group queue for good, bouncing
    (requeueing) the messages of its competitors."""
    t = cleanup.transport(via(proxy), reconnect_interval=0.1)
    await t.connect()
    dest = name("stop-down")
    queue = f"{dest}.g"
    rec = Collect()
    sub = await t.subscribe(SubscriptionSpec(destination=dest, group="g"), rec)
    assert isinstance(sub, RabbitSubscription)

    await link_down(proxy, t, sub)
    await sub.stop()
    await link_up(proxy, t)

    assert await broker.queue_state(queue) == (0, 0), "a stopped subscription has a consumer on the broker"


# -- 3. the group queue deleted while paused: resume() fails and the subscription is dead -------


async def test_resume_after_the_queue_was_deleted_while_paused_consumes_again(
    cleanup: Any, broker: Operator
) -> None:
    """No consumer, so no ``basic.cancel`` and no recovery while paused. resume() sets
    ``_paused = False`` and then consume fails (NOT_FOUND): it raises a raw aio-pika
    error and leaves the subscription "resumed" with no consumer; every later resume()
    is a no-op, so the subscription never delivers again."""
    t = cleanup.transport()
    await t.connect()
    dest = name("resume-deleted")
    queue = f"{dest}.g"
    rec = Collect()
    sub = await t.subscribe(SubscriptionSpec(destination=dest, group="g"), rec)
    assert isinstance(sub, RabbitSubscription)
    await sub.pause()
    await broker.delete_queue(queue)

    raised: BaseException | None = None
    try:
        await sub.resume()
    except Exception as exc:
        raised = exc
    # On this code: ChannelNotFoundEntity (a raw aio-pika error) and paused == False.
    if raised is not None:
        await sub._channel.ready()
        await sub.resume()  # a caller (the breaker) tries again: a no-op here
    assert not sub.paused

    async def consumed() -> bool:
        state = await broker.queue_state(queue)
        return state is not None and state[1] == 1

    try:
        await until(consumed, timeout=10)  # hang guard only: a recovery would take < 1 s
    except TimeoutError:
        pytest.fail(
            f"resumed subscription has no consumer (resume raised {type(raised).__name__}); "
            f"state {sub.describe()}, queue {await broker.queue_state(queue)}"
        )
    sent = Message(body=b"after resume")
    await t.publish(dest, sent)  # routable: the queue is bound again
    await rec.wait(1)
    assert rec.got[0].message.id == sent.id


# -- 4. a delayed message behind a slow confirm ------------------------------------------------


async def test_a_delayed_message_behind_a_slow_confirm_is_not_deliverable_before_its_delay(
    proxy: TCPProxy, cleanup: Any
) -> None:
    """The TTL starts when the broker enqueues, which is after the call was made and a
    confirm round trip before it returns: the contract counts the delay from the call (a
    fixed TTL cannot count it from the return of a call whose confirm is slow)."""
    direct = cleanup.transport()
    await direct.connect()
    t = cleanup.transport(via(proxy), reconnect_interval=0.1, publish_timeout=10)
    await t.connect()
    dest = name("delay-early")
    loop = asyncio.get_running_loop()
    arrived: dict[str, float] = {}
    changed = asyncio.Event()

    async def stamp(d: Delivery) -> None:
        arrived[d.message.id] = loop.time()
        changed.set()
        await d.ack()

    await direct.subscribe(SubscriptionSpec(destination=dest, group="g"), stamp)
    warm = Message(body=b"warm")
    await t.publish(dest, warm, delay=0.001)  # declares the delay route before the slow link
    async with asyncio.timeout(GUARD):
        while warm.id not in arrived:
            changed.clear()
            await changed.wait()

    await proxy.set_mode(ProxyMode.DELAY, delay=0.4)  # each way: the confirm comes ~0.8 s after send
    delayed = Message(body=b"later")
    called = loop.time()
    await t.publish(dest, delayed, delay=1.0)
    assert loop.time() - called >= 0.8  # the confirm was slow indeed
    await proxy.set_mode(ProxyMode.PASS)
    async with asyncio.timeout(GUARD):
        while delayed.id not in arrived:
            changed.clear()
            await changed.wait()
    early = called + 1.0 - arrived[delayed.id]
    assert early <= 0, f"delivered {early:.3f}s before the delay had passed since publish() was called"


# -- 5. resume() called while the link is down --------------------------------------------------


async def test_resume_during_a_link_loss_consumes_once_the_link_is_back(
    proxy: TCPProxy, cleanup: Any, broker: Operator
) -> None:
    """A breaker's half-open resume() may well come while the link is down."""
    direct = cleanup.transport()
    await direct.connect()
    t = cleanup.transport(via(proxy), reconnect_interval=0.1)
    await t.connect()
    dest = name("resume-down")
    queue = f"{dest}.g"
    rec = Collect()
    sub = await t.subscribe(SubscriptionSpec(destination=dest, group="g"), rec)
    assert isinstance(sub, RabbitSubscription)
    await sub.pause()

    await link_down(proxy, t, sub)
    resuming = asyncio.create_task(sub.resume())
    await link_up(proxy, t)
    raised: BaseException | None = None
    try:
        async with asyncio.timeout(GUARD):
            await resuming
    except Exception as exc:
        raised = exc
    await sub._channel.ready()

    async def consumed() -> bool:
        state = await broker.queue_state(queue)
        return state is not None and state[1] >= 1

    try:
        await until(consumed, timeout=10)
    except TimeoutError:
        pytest.fail(f"no consumer after resume() (raised {raised!r}); state {sub.describe()}")
    sent = Message(body=b"after")
    await direct.publish(dest, sent)
    await rec.wait(1)
    assert rec.got[0].message.id == sent.id
    state = await broker.queue_state(queue)
    assert state is not None
    assert state[1] == 1, f"{state[1]} consumers"


# -- 6. stop() while a resume() waits for the link ----------------------------------------------


async def test_stop_while_a_resume_waits_for_the_link_does_not_wait_for_the_broker(
    proxy: TCPProxy, cleanup: Any, broker: Any
) -> None:
    """The breaker's half-open resume runs while the broker is down; a SIGTERM then stops the
    mesh. stop() used to wait on the subscription's lock, held by resume() until the link came
    back (for as long as the broker stayed down)."""
    t = cleanup.transport(via(proxy), reconnect_interval=0.1)
    await t.connect()
    sub = await t.subscribe(SubscriptionSpec(destination=name("stop-hang"), group="g"), Collect())
    await sub.pause()
    await link_down(proxy, t, sub)
    resuming = asyncio.get_running_loop().create_task(sub.resume())
    await resuming  # returns at once: the consume is left to the background recovery
    stopping = asyncio.get_running_loop().create_task(sub.stop())
    done, _ = await asyncio.wait([stopping], timeout=GUARD)
    assert done, "stop() waited for the broker to come back"
    assert not sub.recovering
    await link_up(proxy, t)
