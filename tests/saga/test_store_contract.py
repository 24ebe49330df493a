"""The memory saga store keeps the saga store contract."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from meshlink.message import Message
from meshlink.saga import MemorySagaStore
from meshlink.saga.contract import CHECKS, SagaStoreHarness


class MemoryHarness:
    def __init__(self) -> None:
        self.published: list[tuple[str, Message]] = []
        self.store = MemorySagaStore(publish=self._publish)

    async def _publish(self, destination: str, message: Message) -> None:
        self.published.append((destination, message))

    async def sent(self) -> list[tuple[str, Message]]:
        return list(self.published)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
async def test_memory_saga_store_keeps_the_contract(
    check: Callable[[SagaStoreHarness], Awaitable[None]],
) -> None:
    await check(MemoryHarness())
