"""Timeout: a handler over its deadline is cancelled and fails with a transient error."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from meshlink.errors import HandlerTimeoutError
from meshlink.pipeline import Handler
from meshlink.resilience.policy import parse_duration

__all__ = ["Timeout"]

T = TypeVar("T")


class Timeout:
    """Cancel a try that runs longer than ``seconds`` (per try, not per message).

    A middleware (``Timeout(10)(handler)``) and a wrapper for any coroutine
    function (``await Timeout(10).run(fn, *args)``).
    """

    def __init__(self, seconds: float | str) -> None:
        self.seconds = parse_duration(seconds, setting="timeout")
        if self.seconds == 0:
            raise ValueError("timeout must be > 0")

    async def run(self, fn: Callable[..., Awaitable[T]], *args: object) -> T:
        """Await ``fn(*args)``; cancel it and raise HandlerTimeoutError past the deadline."""
        try:
            async with asyncio.timeout(self.seconds):
                return await fn(*args)
        except TimeoutError as exc:
            raise HandlerTimeoutError(f"handler exceeded its {self.seconds:g}s timeout") from exc

    def __call__(self, next_: Handler) -> Handler:
        async def timed(ctx: object) -> None:
            await self.run(next_, ctx)

        return timed

    def __repr__(self) -> str:
        return f"Timeout({self.seconds:g}s)"
