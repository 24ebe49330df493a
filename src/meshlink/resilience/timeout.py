"""Timeout: a try over its deadline is cancelled and fails with a transient error.

The deadline runs on the injected clock, so tests move a FakeClock past it
instead of waiting. On the system clock a middleware keeps its running tries in
one :class:`~meshlink.deadlines.DeadlineLedger` per loop, with a single timer,
where :func:`asyncio.timeout` schedules and cancels a timer per try (a heap push
each; a third of the policy stack's cost per message).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from weakref import WeakKeyDictionary

from meshlink.clock import Clock, SystemClock
from meshlink.context import Context
from meshlink.deadlines import DeadlineLedger
from meshlink.errors import ConfigurationError, HandlerTimeoutError
from meshlink.pipeline import Handler
from meshlink.resilience.policy import parse_duration

__all__ = ["Timeout"]

T = TypeVar("T")
_Ledger = DeadlineLedger[asyncio.Task[Any]]


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
        # per event loop (a middleware outlives a test's loop: a ledger refers to its loop weakly)
        self._ledgers: WeakKeyDictionary[asyncio.AbstractEventLoop, _Ledger] = WeakKeyDictionary()
        self._ledger: _Ledger | None = None

    async def run(self, fn: Callable[..., Awaitable[T]], *args: object, clock: Clock | None = None) -> T:
        """Await ``fn(*args)``; cancel it and raise HandlerTimeoutError past the deadline."""
        clock = clock or self.clock
        if clock is None or isinstance(clock, SystemClock):
            return await self._run_on_loop(fn, *args)
        return await self._run_on(clock, fn, *args)

    async def _run_on_loop(self, fn: Callable[..., Awaitable[T]], *args: object) -> T:
        """The system clock: the try is entered in this loop's ledger (one timer for all tries)."""
        loop = asyncio.get_running_loop()
        ledger = self._ledger
        if ledger is None or ledger.loop() is not loop:  # the last loop's ledger, without a lookup
            ledger = self._ledgers.get(loop)
            if ledger is None:
                ledger = self._ledgers[loop] = DeadlineLedger(loop, self.seconds, asyncio.Task.cancel)
            self._ledger = ledger
        task = asyncio.current_task()
        assert task is not None
        token = ledger.enter(task, loop)
        try:
            result = await fn(*args)
        except asyncio.CancelledError as exc:
            # ours, and nobody else's (a drain's cancel must still propagate)
            if ledger.leave(token) and task.uncancel() == 0:
                raise self._error() from exc
            raise
        except BaseException:
            if ledger.leave(token):
                task.uncancel()  # the try turned our cancel into another outcome
            raise
        if ledger.leave(token):
            task.uncancel()  # the try swallowed our cancel and finished
        return result

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
            result = await fn(*args)
        except asyncio.CancelledError as exc:
            if fired and task.uncancel() == 0:
                raise self._error() from exc
            raise
        except BaseException:
            if fired:
                task.uncancel()  # the try turned our cancel into another outcome
            raise
        finally:
            dog.cancel()
        if fired:
            task.uncancel()  # the try swallowed our cancel and finished
        return result

    def _error(self) -> HandlerTimeoutError:
        return HandlerTimeoutError(f"handler exceeded its {self.seconds:g}s timeout")

    def __call__(self, next_: Handler) -> Handler:
        async def timed(ctx: Context) -> None:
            clock = ctx.clock
            if isinstance(clock, SystemClock):
                await self._run_on_loop(next_, ctx)
            else:
                await self._run_on(clock, next_, ctx)

        return timed

    def __repr__(self) -> str:
        return f"Timeout({self.seconds:g}s)"
