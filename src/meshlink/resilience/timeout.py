"""Timeout: a try over its deadline is cancelled and fails with a transient error.

The deadline runs on the injected clock, so tests move a FakeClock past it
instead of waiting. On the system clock a middleware keeps its running tries in
one :class:`_Deadlines` ledger with a single event-loop timer: every try of one
middleware has the same timeout, so deadlines arrive in the order tries start
and an insertion-ordered map is already sorted. Entering and leaving cost a map
insert and delete, where :func:`asyncio.timeout` schedules and cancels a timer
per try (a heap push each; a third of the policy stack's cost per message).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from weakref import WeakKeyDictionary, ref

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
        # per event loop (a middleware outlives a test's loop: a ledger refers to its loop weakly)
        self._ledgers: WeakKeyDictionary[asyncio.AbstractEventLoop, _Deadlines] = WeakKeyDictionary()
        self._ledger: _Deadlines | None = None

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
                ledger = self._ledgers[loop] = _Deadlines(loop, self.seconds)
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
            clock = ctx.clock
            if isinstance(clock, SystemClock):
                await self._run_on_loop(next_, ctx)
            else:
                await self._run_on(clock, next_, ctx)

        return timed

    def __repr__(self) -> str:
        return f"Timeout({self.seconds:g}s)"


class _Deadlines:
    """The running tries of one Timeout middleware on one loop, oldest first, with one timer."""

    __slots__ = ("_armed", "_expired", "_next", "_running", "_seconds", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        self.loop = ref(loop)
        self._seconds = seconds
        # token -> (deadline, task); insertion order is deadline order (one timeout for all)
        self._running: OrderedDict[int, tuple[float, asyncio.Task[Any]]] = OrderedDict()
        self._expired: set[int] = set()
        # Whether a timer is set. Not the handle itself: a handle refers to its loop, and this
        # ledger must not keep a finished loop alive (the loop holds the handle, not we).
        self._armed = False
        self._next = 0

    def enter(self, task: asyncio.Task[Any], loop: asyncio.AbstractEventLoop) -> int:
        """A try starts in ``task`` (running on ``loop``, this ledger's); returns its token."""
        token = self._next = self._next + 1
        deadline = loop.time() + self._seconds
        self._running[token] = (deadline, task)
        if not self._armed:
            loop.call_at(deadline, self._fire)
            self._armed = True
        return token

    def leave(self, token: int) -> bool:
        """The try ended; returns whether it was cancelled for its deadline."""
        if self._running.pop(token, None) is not None:
            return False
        self._expired.discard(token)
        return True

    def _fire(self) -> None:
        """Cancel every try past its deadline; re-arm for the oldest one still running."""
        self._armed = False
        loop = self.loop()
        if loop is None:  # pragma: no cover - a timer only runs on its live loop
            return
        now = loop.time()
        running = self._running
        while running:
            token, (deadline, task) = next(iter(running.items()))
            if deadline > now:
                loop.call_at(deadline, self._fire)
                self._armed = True
                return
            del running[token]
            self._expired.add(token)
            task.cancel()
