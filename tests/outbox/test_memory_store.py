"""The memory outbox store keeps the store contract."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import pytest

from meshlink.outbox import MemoryOutboxStore, OutboxEntry
from meshlink.outbox.contract import CHECKS, StoreHarness, entry


class MemoryHarness:
    def __init__(self) -> None:
        self.memory = MemoryOutboxStore()
        self.store = self.memory

    async def add(self, entries: Sequence[OutboxEntry], *, commit: bool = True) -> None:
        tx = self.memory.transaction()
        await self.memory.add(tx, entries)
        if commit:
            tx.commit()
        else:
            tx.rollback()


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
async def test_memory_store_keeps_the_contract(check: Callable[[StoreHarness], Awaitable[None]]) -> None:
    await check(MemoryHarness())


async def test_a_rolled_back_memory_transaction_adds_nothing() -> None:
    store = MemoryOutboxStore()
    tx = store.transaction()
    await store.add(tx, [entry(1)])
    await tx.__aexit__(RuntimeError, RuntimeError("boom"), None)  # what `async with` does on an error
    assert await store.list_pending() == []
