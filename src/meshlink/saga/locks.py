"""One asyncio lock per key, kept only while someone holds or awaits it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

__all__ = ["KeyedLocks"]


class KeyedLocks:
    """``async with locks(key):`` — mutual exclusion per key; a key's lock is dropped when unused.

    The coordinator holds a saga's lock while it moves the saga, so that within one
    process one task at a time advances it (between processes, the store's version
    check does). Unlike a plain ``dict`` of locks it does not grow with every saga
    ever seen.
    """

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    def held(self, key: str) -> bool:
        """Whether a task of this process holds (or waits for) ``key``'s lock."""
        return key in self._locks

    @contextlib.asynccontextmanager
    async def __call__(self, key: str) -> AsyncIterator[None]:
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = (asyncio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._locks[key]
