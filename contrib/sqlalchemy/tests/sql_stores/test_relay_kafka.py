"""SQL outbox → Kafka: nothing from rolled-back transactions, everything exactly once, per-key order."""

from __future__ import annotations

import json

import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from meshlink.outbox import Outbox, Relay
from meshlink.transport.base import Transport
from meshlink_sqlalchemy import SqlStores

from .helpers import Collector, unique, write_many

pytestmark = pytest.mark.kafka


async def relay_until(stores: SqlStores, publisher: Transport, collector: Collector, total: int) -> None:
    """Run one relay until ``total`` distinct messages arrived; then nothing may be left behind."""
    relay = Relay(stores.outbox, publisher, batch_size=500, poll_interval="50ms")
    await relay.start()
    try:
        await collector.until_distinct(total)
    finally:
        await relay.stop()
    stats = await stores.outbox.stats(now=0)
    assert (stats.pending, stats.failed) == (0, 0)


async def test_a_rolled_back_transaction_publishes_nothing(stores: SqlStores, kafka: list[Transport]) -> None:
    destination = unique("outbox.rollback.")
    collector = Collector()
    await collector.start(kafka[0], destination, "g")
    outbox = Outbox(stores.outbox)
    async with AsyncSession(stores.engine) as session:
        await outbox.publish(session, destination, {"n": "rolled back"}, key="k")
        await session.rollback()
    async with AsyncSession(stores.engine) as session, session.begin():
        await outbox.publish(session, destination, {"n": "committed"}, key="k")
    await relay_until(stores, kafka[1], collector, 1)
    # the committed message came after the rolled-back one in the same key: had the rolled-back
    # one been published, it would have arrived first
    assert [json.loads(m.body) for m in collector.messages] == [{"n": "committed"}]


async def test_every_message_is_published_once_in_each_keys_order(
    stores: SqlStores, kafka: list[Transport]
) -> None:
    total = 3_000
    destination = unique("outbox.kafka.")
    collector = Collector()
    await collector.start(kafka[0], destination, "g")
    await write_many(stores, destination, total=total, keys=200)
    await relay_until(stores, kafka[1], collector, total)
    assert len(collector.messages) == total
    assert max(collector.counts().values()) == 1
    collector.assert_key_order()
