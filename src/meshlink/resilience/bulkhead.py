"""Bulkhead: at most N messages of a handler run at once, whatever feeds it.

The transport's prefetch is set to the same N, so a slow handler holds at most
N messages in memory and cannot starve other handlers of the process. The
semaphore matters when a handler is fed by more than one subscription (its
destination and its retry destination).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from meshlink.errors import ConfigurationError
from meshlink.pipeline import Handler

__all__ = ["Bulkhead"]

T = TypeVar("T")


class Bulkhead:
    """Limit concurrent executions to ``concurrency``.

    Attributes:
        running: executions in progress now.
        peak: the most that ever ran at once.
    """

    def __init__(self, concurrency: int = 16) -> None:
        if concurrency < 1:
            raise ConfigurationError("bulkhead.concurrency", f"must be >= 1, got {concurrency}")
        self.concurrency = concurrency
        self._slots = asyncio.Semaphore(concurrency)
        self.running = 0
        self.peak = 0

    @property
    def saturated(self) -> bool:
        """Whether every slot is taken."""
        return self.running >= self.concurrency

    async def run(self, fn: Callable[..., Awaitable[T]], *args: object) -> T:
        """Await ``fn(*args)`` inside a slot."""
        async with self._slots:
            self.running += 1
            self.peak = max(self.peak, self.running)
            try:
                return await fn(*args)
            finally:
                self.running -= 1

    def __call__(self, next_: Handler) -> Handler:
        slots = self._slots

        # run() inlined: one coroutine per message instead of three on the hot path
        async def limited(ctx: object) -> None:
            await slots.acquire()
            self.running += 1
            if self.running > self.peak:
                self.peak = self.running
            try:
                await next_(ctx)  # type: ignore[arg-type]
            finally:
                self.running -= 1
                slots.release()

        return limited

    def __repr__(self) -> str:
        return f"Bulkhead(concurrency={self.concurrency})"
