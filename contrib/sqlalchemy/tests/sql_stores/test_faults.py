"""Faults under the relay: a terminated PostgreSQL backend, a cut broker link, a relay killed mid-batch."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, func, select, text

from meshlink import Mesh, Retry
from meshlink.context import Context
from meshlink.events import DuplicateSkipped, Event, MessageHandled
from meshlink.outbox import OutboxBatchPublished, OutboxBrokerUnavailable, Relay
from meshlink.testing.proxy import ProxyMode, TCPProxy
from meshlink.transport.base import Transport
from meshlink.transport.registry import transport_from_url
from meshlink_sqlalchemy import SqlStores, UnitOfWork

from .helpers import Collector, delete_topology, unique, write_many

pytestmark = [pytest.mark.postgres, pytest.mark.rabbitmq]


class Events:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.changed = asyncio.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        self.changed.set()

    def count(self, kind: type[Event]) -> int:
        return sum(1 for e in self.events if isinstance(e, kind))

    async def until(self, condition: object, timeout: float = 90.0) -> None:
        async def wait() -> None:
            while not condition():  # type: ignore[operator]
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), timeout)  # a guard against hanging, not a timing check


@pytest.fixture
async def rabbit_pair(rabbit_url: str) -> AsyncIterator[tuple[Transport, Transport]]:
    consumer, publisher = transport_from_url(rabbit_url), transport_from_url(rabbit_url)
    await consumer.connect()
    await publisher.connect()
    yield consumer, publisher
    await publisher.close()
    await consumer.close()
    await delete_topology(rabbit_url, consumer)


async def test_the_relay_reconnects_after_its_postgres_backends_are_terminated(
    pg_url: str, rabbit_pair: tuple[Transport, Transport]
) -> None:
    app = unique("relay")
    stores = SqlStores(pg_url, connect_args={"server_settings": {"application_name": app}})
    await stores.init()
    consumer, publisher = rabbit_pair
    destination = unique("outbox.terminate.")
    collector = Collector()
    await collector.start(consumer, destination, "g")
    events = Events()
    relay = Relay(stores.outbox, publisher, batch_size=100, poll_interval="100ms", emit=events)
    try:
        await relay.start()
        await write_many(stores, destination, total=300, keys=10)
        await collector.until_distinct(300)
        async with stores.engine.connect() as admin:
            killed = await admin.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = :app AND pid <> pg_backend_pid()"
                ),
                {"app": app},
            )
            assert killed.scalar() >= 1  # at least the LISTEN connection
        await write_many(stores, destination, total=300, keys=10)
        await collector.until_distinct(600)
        assert relay.running
        await relay.stop()  # finishes the batch in hand: its rows are marked sent
        assert (await stores.outbox.stats(now=0)).pending == 0
    finally:
        await relay.stop()
        await stores.drop()
        await stores.close()


@pytest.mark.chaos
async def test_a_cut_broker_link_loses_nothing(pg_stores: SqlStores, rabbit_url: str) -> None:
    parts = urlsplit(rabbit_url)
    consumer = transport_from_url(rabbit_url)
    await consumer.connect()
    destination = unique("outbox.cut.")
    collector = Collector()
    await collector.start(consumer, destination, "g")
    await write_many(pg_stores, destination, total=3000, keys=50)
    events = Events()
    async with TCPProxy(parts.hostname or "127.0.0.1", parts.port or 5672) as proxy:
        publisher = transport_from_url(f"amqp://guest:guest@127.0.0.1:{proxy.port}/?heartbeat=2")
        await publisher.connect()
        relay = Relay(pg_stores.outbox, publisher, batch_size=100, emit=events)
        await relay.start()
        try:
            await events.until(lambda: events.count(OutboxBatchPublished) >= 3)
            await proxy.cut(then=ProxyMode.REFUSE)
            await events.until(lambda: events.count(OutboxBrokerUnavailable) >= 1)
            await proxy.restore()
            await collector.until_distinct(3000, timeout=120)
        finally:
            await relay.stop()
            await publisher.close()
    assert set(collector.counts()) >= {m.id for m in collector.messages}
    assert len(collector.counts()) == 3000  # 0 lost; duplicates allowed only for unconfirmed publishes
    await consumer.close()
    await delete_topology(rabbit_url, consumer)


@pytest.mark.chaos
async def test_a_relay_killed_mid_batch_loses_nothing_and_the_inbox_applies_each_effect_once(
    pg_url: str, rabbit_url: str
) -> None:
    stores = SqlStores(pg_url)
    await stores.init()
    effects = Table(
        f"{stores.tables.prefix}effects",
        MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("message_id", String(64), nullable=False),
    )
    async with stores.engine.begin() as conn:
        await conn.run_sync(effects.metadata.create_all)
    destination, total, batch = unique("outbox.kill."), 1000, 200
    await write_many(stores, destination, total=total, keys=20)

    service = unique("svc")
    mesh = Mesh(rabbit_url, service=service)
    events = Events()
    mesh.add_listener(events)

    @mesh.handler(destination, unit_of_work=UnitOfWork(stores), idempotency=None, retry=Retry(attempts=1))
    async def apply(body: dict[str, int], ctx: Context) -> None:
        await ctx.session.execute(effects.insert().values(message_id=ctx.message.id))

    try:
        script = Path(__file__).with_name("relay_process.py")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        async with mesh:
            child = await asyncio.create_subprocess_exec(
                *(sys.executable, str(script), pg_url, rabbit_url, str(batch)),
                stdout=asyncio.subprocess.PIPE,
                env=env,
            )
            assert child.stdout is not None
            try:
                while True:
                    line = (await asyncio.wait_for(child.stdout.readline(), 60)).decode()
                    assert line, "the relay process ended before its fault point"
                    if line.startswith("PUBLISHED"):
                        in_flight = int(line.split()[1])
                        break
            finally:
                if child.returncode is None:  # at the fault point (or on a failure): never leave it running
                    os.kill(child.pid, signal.SIGKILL)  # confirmed by the broker, never marked sent
                await child.wait()
            relay = Relay(stores.outbox, mesh.transport, lease="1s", poll_interval="200ms")
            await relay.start()
            try:
                # every row once, and the killed batch's rows a second time (skipped by the inbox)
                await events.until(lambda: events.count(MessageHandled) >= total + in_flight)
            finally:
                await relay.stop()
        async with stores.engine.connect() as conn:
            rows, distinct = (
                await conn.execute(select(func.count(), func.count(effects.c.message_id.distinct())))
            ).one()
        assert (rows, distinct) == (total, total)  # each side effect exactly once
        assert events.count(DuplicateSkipped) == in_flight <= batch  # duplicates only from the killed batch
    finally:
        async with stores.engine.begin() as conn:
            await conn.run_sync(effects.metadata.drop_all)
        await stores.drop()
        await stores.close()
        await delete_topology(rabbit_url, mesh.transport)


async def test_the_relay_has_its_own_pool_without_pre_ping_and_the_application_keeps_pre_ping(
    pg_url: str,
) -> None:
    """The relay's operations retry lost connections themselves; the application's engine pings."""
    stores = SqlStores(pg_url)
    try:
        relay_engine = stores.outbox.relay_engine
        assert relay_engine is not stores.engine
        assert stores.engine.sync_engine.pool._pre_ping
        assert not relay_engine.sync_engine.pool._pre_ping
        await stores.init()
        assert (await stores.outbox.stats(now=0)).pending == 0  # the relay's engine works
        async with relay_engine.connect() as conn:
            # the claim statement's estimate crosses jit_above_cost; compiling it cost more
            # than the claim itself, so the relay's connections run without JIT
            assert (await conn.execute(text("SHOW jit"))).scalar() == "off"
        async with stores.engine.connect() as conn:
            assert (await conn.execute(text("SHOW jit"))).scalar() == "on"  # the application's: untouched
        await stores.drop()
    finally:
        await stores.close()
