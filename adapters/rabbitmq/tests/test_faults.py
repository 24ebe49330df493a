"""Link faults between the transport and RabbitMQ, injected with the TCP proxy.

Every fault is triggered on progress (messages handled, links seen lost), never
on wall time; timeouts are hang guards only.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from meshlink.errors import PublishBatchError, PublishError, PublishTimeoutError, TransportConnectionError
from meshlink.message import Message
from meshlink.testing.proxy import ProxyMode, TCPProxy
from meshlink.transport.base import Delivery, Outgoing, SubscriptionSpec
from meshlink_rabbitmq import RabbitTransport

pytestmark = pytest.mark.rabbitmq
GUARD = 60.0


@pytest.fixture
async def proxy(rabbit_url: str) -> AsyncIterator[TCPProxy]:
    parts = urlsplit(rabbit_url)
    async with TCPProxy(parts.hostname or "127.0.0.1", parts.port or 5672) as p:
        yield p


def via(proxy: TCPProxy) -> str:
    return f"amqp://guest:guest@127.0.0.1:{proxy.port}/"


async def until(predicate: Any, timeout: float = GUARD) -> None:
    """Await a condition that aio-pika's callbacks make true.

    Polls because the state (link lost / restored) is flipped inside aio-pika, which
    offers no awaitable for it; the timeout is a hang guard only.
    """
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_first_connect_fails_fast_when_the_broker_refuses(proxy: TCPProxy) -> None:
    await proxy.set_mode(ProxyMode.REFUSE)
    t = RabbitTransport(via(proxy), connect_timeout=5)
    with pytest.raises(TransportConnectionError):
        await t.connect()


async def test_first_connect_times_out_on_a_dead_peer(proxy: TCPProxy) -> None:
    await proxy.set_mode(ProxyMode.BLACKHOLE)
    t = RabbitTransport(via(proxy), connect_timeout=0.5)
    with pytest.raises(TransportConnectionError):
        await t.connect()


async def test_publish_on_a_blackholed_link_times_out_with_outcome_unknown(
    proxy: TCPProxy, cleanup: Any
) -> None:
    t = cleanup.transport(via(proxy), publish_timeout=0.5)
    await t.connect()
    dest = f"bh-{uuid.uuid4().hex[:8]}"
    await t.declare(dest, "g")
    await proxy.set_mode(ProxyMode.BLACKHOLE)
    with pytest.raises(PublishTimeoutError):
        await t.publish(dest, Message(body=b"x"))
    await proxy.cut()


async def test_settling_a_delivery_from_a_dead_channel_is_a_no_op_and_it_comes_back(
    proxy: TCPProxy, cleanup: Any
) -> None:
    direct = cleanup.transport()
    await direct.connect()
    t = cleanup.transport(via(proxy), reconnect_interval=0.1)
    await t.connect()
    dest = f"stale-{uuid.uuid4().hex[:8]}"
    got: list[Delivery] = []
    arrived = asyncio.Event()

    async def hold(d: Delivery) -> None:
        got.append(d)
        arrived.set()

    await t.subscribe(SubscriptionSpec(destination=dest, group="g"), hold)
    sent = Message(body=b"1")
    await direct.publish(dest, sent)
    await asyncio.wait_for(arrived.wait(), GUARD)
    arrived.clear()
    lost_before = t.disconnects
    await proxy.cut()
    await until(lambda: t.disconnects > lost_before)
    await got[0].ack()  # the channel it came on is gone: no error, no effect
    await asyncio.wait_for(arrived.wait(), GUARD)
    assert got[1].message.id == sent.id
    assert got[1].redelivered
    await got[1].ack()


async def test_5000_messages_survive_two_cuts_of_the_link(proxy: TCPProxy, cleanup: Any) -> None:
    total = 5000
    pub = cleanup.transport(via(proxy), reconnect_interval=0.1, publish_timeout=5)
    con = cleanup.transport(via(proxy), reconnect_interval=0.1)
    await pub.connect()
    await con.connect()
    dest = f"chaos-{uuid.uuid4().hex[:8]}"
    seen: set[str] = set()
    progress = asyncio.Event()

    async def handle(d: Delivery) -> None:
        seen.add(d.message.id)
        progress.set()
        await d.ack()

    await con.subscribe(SubscriptionSpec(destination=dest, group="g", prefetch=50), handle)
    messages = [Message(body=f'{{"n": {i}}}'.encode(), key=f"k{i % 10}") for i in range(total)]
    failures: list[BaseException] = []

    async def publisher() -> None:
        for start in range(0, total, 100):
            remaining = messages[start : start + 100]
            while remaining:
                try:
                    await pub.publish_many([Outgoing(destination=dest, message=m) for m in remaining])
                    remaining = []
                except PublishBatchError as exc:
                    failures.extend(e for _, e in exc.failures)
                    remaining = [remaining[i] for i, _ in exc.failures]

    async def wait_seen(n: int) -> None:
        while len(seen) < n:
            progress.clear()
            await progress.wait()

    async def chaos() -> None:
        for threshold in (1500, 3500):
            await wait_seen(threshold)
            lost = (pub.disconnects, con.disconnects)
            back = (pub.reconnects, con.reconnects)
            assert await proxy.cut(then=ProxyMode.REFUSE) >= 2
            await until(lambda: pub.disconnects > lost[0] and con.disconnects > lost[1])  # noqa: B023
            await proxy.restore()
            await until(lambda: pub.reconnects > back[0] and con.reconnects > back[1])  # noqa: B023

    async with asyncio.timeout(180):
        await asyncio.gather(publisher(), chaos())
        await wait_seen(total)
    assert seen == {m.id for m in messages}
    assert proxy.stats.cut >= 4
    # Only typed "not confirmed" errors reached the publisher, and it retried each.
    assert all(isinstance(e, PublishError) for e in failures), {type(e) for e in failures}
