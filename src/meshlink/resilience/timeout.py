"""Timeout: a try over its deadline is cancelled and fails with a transient error.

The deadline runs on the injected clock, so tests move a FakeClock past it
instead of waiting; on the system clock it is plain :func:`asyncio.timeout`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from meshlink.clock import Clock, SystemClock
from meshlink.context import Context
from meshlink.errors import ConfigurationError, HandlerTimeoutError
from meshlink.pipeline import Handler
from meshlink.resilience.policy import parse_duration

__all__ = ["Timeout"]

T = TypeVar("T")


class Timeout:
    """Cancel a try that runs longer than ``seconds`` (per try, not per message).

    A middleware (``Timeout(10)(handler)``, using the mesh's clock) and a wrapper
    for any coroutine function (``await Timeout(10).run(fn, *args)``).
    """

    def __init__(self, seconds: float | str, *, clock: Clock | None = None) -> None:
        self.seconds = parse_duration(seconds, setting="timeout")
        if self.seconds == 0:
            raise ConfigurationError("timeout", "must be > 0")
        self.clock = clock

    async def run(self, fn: Callable[..., Awaitable[T]], *args: object, clock: Clock | None = None) -> T:
        """Await ``fn(*args)``; cancel it and raise HandlerTimeoutError past the deadline."""
        clock = clock or self.clock
        if clock is None or isinstance(clock, SystemClock):
            try:
                async with asyncio.timeout(self.seconds):
                    return await fn(*args)
            except TimeoutError as exc:
                raise self._error() from exc
        return await self._run_on(clock, fn, *args)

    async def _run_on(self, clock: Clock, fn: Callable[..., Awaitable[T]], *args: object) -> T:
        task = asyncio.current_task()
        assert task is not None
        fired = False

        async def watchdog() -> None:
            nonlocal fired
            await clock.sleep(self.seconds)
            fired = True
            task.cancel()

        dog = asyncio.get_running_loop().create_task(watchdog())
        try:
            return await fn(*args)
        except asyncio.CancelledError as exc:
            if fired and task.uncancel() == 0:
                raise self._error() from exc
            raise
        finally:
            dog.cancel()

    def _error(self) -> HandlerTimeoutError:
        return HandlerTimeoutError(f"handler exceeded its {self.seconds:g}s timeout")

    def __call__(self, next_: Handler) -> Handler:
        async def timed(ctx: Context) -> None:
            await self.run(next_, ctx, clock=ctx.clock)

        return timed

    def __repr__(self) -> str:
        return f"Timeout({self.seconds:g}s)"
