"""The SQL saga store keeps the saga store contract on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from meshlink.message import Message
from meshlink.outbox.relay import decode_row
from meshlink.saga.contract import CHECKS, NOW, SagaStoreHarness, command, instance
from meshlink_sqlalchemy import SqlSagaInstanceStore, SqlStores


class SqlHarness:
    def __init__(self, stores: SqlStores) -> None:
        self.stores = stores
        self.store = SqlSagaInstanceStore(stores)

    async def sent(self) -> list[tuple[str, Message]]:
        """The commands committed to the outbox."""
        return [(r.destination, decode_row(r)) for r in await self.stores.outbox.list_pending()]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
async def test_sql_saga_store_keeps_the_contract(
    check: Callable[[SagaStoreHarness], Awaitable[None]], stores: SqlStores
) -> None:
    await check(SqlHarness(stores))


async def test_each_saved_transition_leaves_one_history_row_and_wakes_the_relay(stores: SqlStores) -> None:
    wakes: list[int] = []
    store = SqlSagaInstanceStore(stores, wake=lambda: wakes.append(1))
    a = await store.save(instance("a"))
    await store.save(instance("b"))
    results = await store.save_many(
        [(a.log(NOW, "x", "sent"), [command(1)]), (instance("a2"), []), (instance("b"), [command(2)])]
    )
    assert [type(r).__name__ for r in results] == ["SagaInstance", "SagaInstance", "StaleSagaError"]
    history = [(h.version, h.event) for h in await stores.sagas.history("a")]
    assert history == [(1, "started"), (2, "sent")]
    assert [(h.version, h.event) for h in await stores.sagas.history("a2")] == [(1, "started")]
    assert wakes == [1], "woken once, by the commit that wrote a command"
