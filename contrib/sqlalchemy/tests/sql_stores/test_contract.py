"""The SQL outbox store keeps the store contract on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import pytest

from meshlink.outbox import OutboxEntry
from meshlink.outbox.contract import CHECKS, StoreHarness
from meshlink_sqlalchemy import SqlOutboxStore, SqlStores


class SqlHarness:
    def __init__(self, stores: SqlStores) -> None:
        self.stores = stores
        self.store: SqlOutboxStore = stores.outbox

    async def add(self, entries: Sequence[OutboxEntry], *, commit: bool = True) -> None:
        async with self.stores.engine.connect() as conn:
            await self.store.add(conn, entries)
            if commit:
                await conn.commit()
            else:
                await conn.rollback()


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
async def test_sql_store_keeps_the_contract(
    check: Callable[[StoreHarness], Awaitable[None]], stores: SqlStores
) -> None:
    await check(SqlHarness(stores))
