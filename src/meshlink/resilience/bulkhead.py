"""Bulkhead: at most N messages of a handler run at once, whatever feeds it.

The transport's prefetch is set to the same N, so a slow handler holds at most
N messages in memory and cannot starve other handlers of the process. The
semaphore matters when a handler is fed by more than one subscription (its
destination and its retry destination).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

from meshlink.errors import ConfigurationError
from meshlink.pipeline import Handler

__all__ = ["Bulkhead"]

T = TypeVar("T")


class Bulkhead:
    """Limit concurrent executions to ``concurrency``; callers past it wait in arrival order.

    The slots are counted here rather than with :class:`asyncio.Semaphore`: its
    ``acquire`` scans its waiters on every call (``locked()``), which is most of
    the cost of this middleware on a path that runs for every message. A freed
    slot is handed straight to the oldest waiter, so a newcomer never overtakes it.

    Attributes:
        running: executions in progress now (including a waiter just handed a slot).
        peak: the most that ever ran at once.
    """

    def __init__(self, concurrency: int = 16) -> None:
        if concurrency < 1:
            raise ConfigurationError("bulkhead.concurrency", f"must be >= 1, got {concurrency}")
        self.concurrency = concurrency
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.running = 0
        self.peak = 0

    @property
    def saturated(self) -> bool:
        """Whether every slot is taken."""
        return self.running >= self.concurrency

    async def _enter(self) -> None:
        if self.running < self.concurrency and not self._waiters:
            self.running += 1
        else:
            await self._wait_for_slot()
        if self.running > self.peak:
            self.peak = self.running

    async def _wait_for_slot(self) -> None:
        slot: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(slot)
        try:
            await slot  # _leave() counts the slot as ours before it wakes us
        except asyncio.CancelledError:
            if slot.done() and not slot.cancelled():
                self._leave()  # handed a slot, then cancelled before using it: pass it on
            elif slot in self._waiters:  # (a _leave() may have dropped it already)
                self._waiters.remove(slot)
            raise

    def _leave(self) -> None:
        waiters = self._waiters
        while waiters:
            slot = waiters.popleft()
            if not slot.done():
                slot.set_result(None)  # the slot changes hands: running stays the same
                return
        self.running -= 1

    async def run(self, fn: Callable[..., Awaitable[T]], *args: object) -> T:
        """Await ``fn(*args)`` inside a slot."""
        await self._enter()
        try:
            return await fn(*args)
        finally:
            self._leave()

    def __call__(self, next_: Handler) -> Handler:
        concurrency = self.concurrency
        waiters = self._waiters

        # _enter() inlined for a free slot: one coroutine per message on the hot path
        async def limited(ctx: object) -> None:
            if self.running < concurrency and not waiters:
                self.running += 1
                if self.running > self.peak:
                    self.peak = self.running
            else:
                await self._enter()
            try:
                await next_(ctx)  # type: ignore[arg-type]
            finally:
                self._leave()

        return limited

    def __repr__(self) -> str:
        return f"Bulkhead(concurrency={self.concurrency})"
