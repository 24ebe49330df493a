"""The inbox and the unit of work: the record, the handler's writes and its messages commit together."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, func, select

from meshlink import Mesh, Message, Retry
from meshlink.context import Context
from meshlink.resilience.idempotency import Claim
from meshlink.testing import MeshHarness
from meshlink_sqlalchemy import SqlStores, UnitOfWork


@pytest.fixture
async def effects(stores: SqlStores) -> AsyncIterator[Table]:
    table = Table(
        f"{stores.tables.prefix}effects",
        MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("message_id", String(64), nullable=False),
    )
    async with stores.engine.begin() as conn:
        await conn.run_sync(table.metadata.create_all)
    yield table
    async with stores.engine.begin() as conn:
        await conn.run_sync(table.metadata.drop_all)


def mesh_with_handler(url: str, stores: SqlStores, effects: Table, *, fail: bool = False) -> Mesh:
    mesh = Mesh(url, service="billing")

    uow = UnitOfWork(stores)

    @mesh.handler("orders", unit_of_work=uow, idempotency=None, retry=Retry(attempts=1, redeliver=[]))
    async def charge(body: dict[str, int], ctx: Context) -> None:
        await ctx.session.execute(effects.insert().values(message_id=ctx.message.id))
        await ctx.publish("payments", {"n": body["n"]}, key="p")
        if fail:
            raise RuntimeError("after writing")

    return mesh


async def count(stores: SqlStores, table: Table) -> int:
    async with stores.engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar() or 0)


async def test_a_duplicate_delivery_applies_its_effect_once_and_writes_one_outgoing_row(
    stores: SqlStores, effects: Table, memory_url: str
) -> None:
    mesh = mesh_with_handler(memory_url, stores, effects)
    async with MeshHarness(mesh) as h:
        message = mesh.message({"n": 1})
        await h.publish("orders", message)
        await h.idle()
        await h.publish("orders", message)  # redelivered: same id
        await h.idle()
    assert await count(stores, effects) == 1
    [row] = await stores.outbox.list_pending()
    assert (row.destination, row.key) == ("payments", "p")
    assert await count(stores, stores.tables.inbox) == 1


async def test_a_failing_handler_leaves_no_effect_no_inbox_record_and_no_outgoing_row(
    stores: SqlStores, effects: Table, memory_url: str
) -> None:
    mesh = mesh_with_handler(memory_url, stores, effects, fail=True)
    async with MeshHarness(mesh) as h:
        await h.publish("orders", Message(body=b'{"n": 1}'))
        await h.idle()
        assert len(h.dead_lettered) == 1
    assert await count(stores, effects) == 0
    assert await count(stores, stores.tables.inbox) == 0
    assert await stores.outbox.list_pending() == []


async def test_the_inbox_is_an_idempotency_store(stores: SqlStores) -> None:
    inbox = stores.inbox
    assert await inbox.claim("k", token="a", lease=30) is Claim.CLAIMED
    assert await inbox.claim("k", token="b", lease=30) is Claim.IN_PROGRESS
    await inbox.release("k", token="a")
    assert await inbox.claim("k", token="b", lease=30) is Claim.CLAIMED
    await inbox.complete("k", token="b", ttl=60)
    assert await inbox.claim("k", token="c", lease=30) is Claim.DONE


async def test_each_immediate_retry_gets_its_own_transaction(
    stores: SqlStores, effects: Table, memory_url: str
) -> None:
    mesh = Mesh(memory_url, service="billing")
    tries = 0

    @mesh.handler(
        "orders", unit_of_work=UnitOfWork(stores), idempotency=None, retry=Retry(attempts=3, backoff=0)
    )
    async def charge(body: dict[str, int], ctx: Context) -> None:
        nonlocal tries
        tries += 1
        await ctx.session.execute(effects.insert().values(message_id=f"{ctx.message.id}-{tries}"))
        await ctx.publish("payments", {"try": tries}, key="p")
        if tries == 1:
            raise RuntimeError("first try fails after writing")

    async with MeshHarness(mesh) as h:
        await h.publish("orders", {"n": 1})
        await h.idle()
    assert tries == 2
    assert await count(stores, effects) == 1, "the failed try's write was rolled back"
    [row] = await stores.outbox.list_pending()
    assert row.destination == "payments"
    assert await count(stores, stores.tables.inbox) == 1
