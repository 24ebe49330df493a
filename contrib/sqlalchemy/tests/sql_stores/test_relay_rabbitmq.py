"""SQL outbox → RabbitMQ: nothing from rolled-back transactions, everything exactly once, per-key order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from meshlink.outbox import Outbox, Relay
from meshlink.transport.base import Transport
from meshlink.transport.registry import transport_from_url
from meshlink_sqlalchemy import SqlStores

from .helpers import Collector, bodies, delete_topology, unique, write_many

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
async def transports(rabbit_url: str) -> AsyncIterator[list[Transport]]:
    """Four connected transports: [0] consumes, the others publish for relays. Topology deleted after."""
    made = [transport_from_url(rabbit_url) for _ in range(4)]
    for t in made:
        await t.connect()
    yield made
    for t in made:
        await t.close()
    await delete_topology(rabbit_url, made[0])


async def run_relays(
    stores: SqlStores, publishers: list[Transport], collector: Collector, total: int
) -> None:
    relays = [Relay(stores.outbox, t, batch_size=500, poll_interval="50ms") for t in publishers]
    for relay in relays:
        await relay.start()
    try:
        await collector.until_distinct(total)
    finally:
        for relay in relays:
            await relay.stop()
    stats = await stores.outbox.stats(now=0)
    assert (stats.pending, stats.failed) == (0, 0)


async def test_a_rolled_back_transaction_publishes_nothing(
    stores: SqlStores, transports: list[Transport]
) -> None:
    destination = unique("outbox.rollback.")
    collector = Collector()
    await collector.start(transports[0], destination, "g")
    outbox = Outbox(stores.outbox)
    async with AsyncSession(stores.engine) as session:
        await outbox.publish(session, destination, {"n": "rolled back"}, key="k")
        await session.rollback()
    async with AsyncSession(stores.engine) as session, session.begin():
        await outbox.publish(session, destination, {"n": "committed"}, key="k")
    await run_relays(stores, transports[1:2], collector, 1)
    assert bodies(collector.messages) == [{"n": "committed"}]


SIZES = [2_000, pytest.param(10_000, marks=pytest.mark.chaos)]


@pytest.mark.parametrize("total", SIZES)
async def test_concurrent_writes_are_published_exactly_once_by_one_relay(
    stores: SqlStores, transports: list[Transport], total: int
) -> None:
    destination = unique("outbox.one.")
    collector = Collector()
    await collector.start(transports[0], destination, "g")
    await write_many(stores, destination, total=total, keys=200)
    await run_relays(stores, transports[1:2], collector, total)
    assert len(collector.messages) == total
    assert max(collector.counts().values()) == 1
    collector.assert_key_order()


@pytest.mark.parametrize("total", SIZES)
async def test_three_relays_publish_exactly_once_and_keep_each_keys_order(
    pg_stores: SqlStores, transports: list[Transport], total: int
) -> None:
    destination = unique("outbox.three.")
    collector = Collector()
    await collector.start(transports[0], destination, "g")
    writing = asyncio.create_task(write_many(pg_stores, destination, total=total, keys=100))
    await run_relays(pg_stores, transports[1:4], collector, total)  # relays run while writers write
    await writing
    assert len(collector.messages) == total
    assert max(collector.counts().values()) == 1
    collector.assert_key_order()
