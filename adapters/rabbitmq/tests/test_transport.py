"""RabbitMQ-specific behaviour beyond the conformance suite, on the real server."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from rabbit_helpers import Collect, name

from meshlink.errors import ConfigurationError, UnroutableError
from meshlink.message import Message
from meshlink.transport.base import Explainable, Outgoing, SubscriptionSpec
from meshlink_rabbitmq import MessageTooLargeError, RabbitSettings
from meshlink_rabbitmq.delay import delay_ms

pytestmark = pytest.mark.rabbitmq


def test_delay_is_rounded_up_never_down() -> None:
    s = RabbitSettings(delay_pad=0.0, delay_digits=2)
    assert delay_ms(1.0, s) == 1000
    assert delay_ms(1.001, s) == 1100
    assert delay_ms(0.0004, s) == 1
    assert delay_ms(12.34, s) == 13000
    assert delay_ms(1.0, RabbitSettings(delay_pad=0.02)) == 1020


async def test_topology_is_explained(cleanup: Any) -> None:
    t = cleanup.transport()
    await t.connect()
    dest = name("explain")
    await t.declare(dest, "billing")
    assert isinstance(t, Explainable)
    kinds = {(r["kind"], r.get("name") or r.get("destination")) for r in t.explain()}
    assert ("exchange", dest) in kinds
    assert ("queue", f"{dest}.billing") in kinds
    assert ("binding", f"{dest}.billing") in kinds


async def test_publishing_to_a_never_declared_destination_is_unroutable_and_the_channel_survives(
    cleanup: Any,
) -> None:
    t = cleanup.transport()
    await t.connect()
    with pytest.raises(UnroutableError):
        await t.publish(name("nowhere"), Message(body=b"x"))
    dest = name("after")
    rec = Collect()
    await t.subscribe(SubscriptionSpec(destination=dest, group="g"), rec)
    await t.publish(dest, Message(body=b"y"))
    await rec.wait(1)


async def test_an_oversized_body_is_refused_before_sending(cleanup: Any) -> None:
    t = cleanup.transport(max_message_size=10)
    await t.connect()
    with pytest.raises(MessageTooLargeError):
        await t.publish(name("big"), Message(body=b"x" * 11))


async def test_a_clashing_queue_declaration_is_a_configuration_error(cleanup: Any) -> None:
    classic, quorum = cleanup.transport(), cleanup.transport(queue_type="quorum")
    await classic.connect()
    await quorum.connect()
    dest = name("clash")
    await classic.declare(dest, "g")
    with pytest.raises(ConfigurationError):
        await quorum.declare(dest, "g")
    # The transport is still usable afterwards.
    await quorum.declare(dest, "other")


async def test_delayed_message_keeps_key_and_envelope_and_is_never_early(cleanup: Any) -> None:
    t = cleanup.transport()
    await t.connect()
    dest = name("delay")
    rec = Collect()
    await t.subscribe(SubscriptionSpec(destination=dest, group="g"), rec)
    loop = asyncio.get_running_loop()
    sent = Message(body=b"{}", key="order-1", headers={"tenant": "acme"}, attempt=2)
    delays = [0.3, 0.5]
    returned_at: dict[str, float] = {}
    msgs = []
    for d in delays:
        m = sent.replace(id=uuid.uuid4().hex)
        await t.publish(dest, m, delay=d)
        returned_at[m.id] = loop.time()
        msgs.append((m, d))
    arrived: dict[str, float] = {}

    async def watch() -> None:
        while len(arrived) < len(delays):
            await rec.wait(len(arrived) + 1)
            for dl in rec.got:
                arrived.setdefault(dl.message.id, loop.time())

    await watch()
    for m, d in msgs:
        assert arrived[m.id] - returned_at[m.id] >= d, "delivered early"
        got = next(x.message for x in rec.got if x.message.id == m.id)
        assert got == m


async def test_pause_gives_back_in_flight_messages_and_loses_none(cleanup: Any) -> None:
    t = cleanup.transport()
    await t.connect()
    dest = name("pause")
    rec = Collect()
    sub = await t.subscribe(SubscriptionSpec(destination=dest, group="g", prefetch=20), rec)
    sent = [Message(body=str(i).encode()) for i in range(400)]
    publishing = asyncio.create_task(t.publish_many([Outgoing(destination=dest, message=m) for m in sent]))
    for _ in range(3):
        await rec.wait(len(rec.got) + 10)
        await sub.pause()
        handed = len(rec.got)
        # While paused nothing is handed over, even with messages ready in the queue.
        if not publishing.done():
            await publishing
        await t.publish(dest, probe := Message(body=b"probe"))
        sent.append(probe)
        assert len(rec.got) == handed
        await sub.resume()
    await publishing
    await rec.wait(len(sent))
    ids = [d.message.id for d in rec.got]
    assert set(ids) == {m.id for m in sent}
    assert len(ids) == len(set(ids)), "a message acked once was handed over again"


async def test_quorum_queue_counts_deliveries(cleanup: Any) -> None:
    t = cleanup.transport(queue_type="quorum")
    await t.connect()
    dest = name("quorum")
    rec = Collect(ack=False)
    await t.subscribe(SubscriptionSpec(destination=dest, group="g"), rec)
    await t.publish(dest, Message(body=b"1"))
    await rec.wait(1)
    assert rec.got[0].delivery_count == 1
    await rec.got[0].nack()
    await rec.wait(2)
    await rec.got[1].nack()
    await rec.wait(3)
    assert [d.delivery_count for d in rec.got] == [1, 2, 3]
    await rec.got[2].ack()


async def test_single_active_consumer_queue_feeds_one_subscription(cleanup: Any) -> None:
    a, b = cleanup.transport(), cleanup.transport()
    await a.connect()
    await b.connect()
    dest = name("sac")
    ra, rb = Collect(), Collect()
    spec = SubscriptionSpec(destination=dest, group="g", options={"single_active_consumer": True})
    await a.subscribe(spec, ra)
    await b.subscribe(spec, rb)
    await a.publish_many([Outgoing(destination=dest, message=Message(body=b"x", key="k")) for _ in range(50)])
    await ra.wait(50)
    assert rb.got == []
