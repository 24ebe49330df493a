"""The Timeout middleware on the system clock: one ledger and one timer per middleware."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from meshlink.clock import SystemClock
from meshlink.errors import HandlerTimeoutError
from meshlink.resilience.timeout import Timeout


class _Ctx:
    """The one thing the middleware reads from a Context."""

    clock = SystemClock()


def _timed(seconds: float, fn: Any) -> Any:
    return Timeout(seconds)(fn)


async def test_a_try_past_its_deadline_is_cancelled_and_fails_with_a_timeout() -> None:
    cancelled = asyncio.Event()

    async def hangs(ctx: object) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(HandlerTimeoutError):
        await _timed(0.05, hangs)(_Ctx())
    assert cancelled.is_set()
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0  # our cancel was taken back


async def test_only_the_tries_past_their_deadline_are_cancelled() -> None:
    class Ctx(_Ctx):
        def __init__(self, slow: bool) -> None:
            self.slow = slow

    async def handler(ctx: Ctx) -> None:
        if ctx.slow:
            await asyncio.Event().wait()
        for _ in range(10):
            await asyncio.sleep(0)

    timed = _timed(0.05, handler)
    outcomes: dict[int, str] = {}

    async def one(i: int) -> None:
        try:
            await timed(Ctx(slow=i % 3 == 0))
            outcomes[i] = "done"
        except HandlerTimeoutError:
            outcomes[i] = "timeout"

    for _ in range(2):  # a second round through the same middleware and timer
        outcomes.clear()
        await asyncio.gather(*(one(i) for i in range(12)))
        assert {i for i, o in outcomes.items() if o == "timeout"} == {0, 3, 6, 9}
        assert {i for i, o in outcomes.items() if o == "done"} == {1, 2, 4, 5, 7, 8, 10, 11}


async def test_a_cancel_from_outside_propagates_as_a_cancel_not_a_timeout() -> None:
    started = asyncio.Event()

    async def hangs(ctx: object) -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.get_running_loop().create_task(_timed(30, hangs)(_Ctx()))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_try_that_swallows_the_cancel_finishes_and_leaves_no_cancel_pending() -> None:
    swallowed = asyncio.Event()

    async def stubborn(ctx: object) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            swallowed.set()

    async def run() -> int:
        await _timed(0.05, stubborn)(_Ctx())
        task = asyncio.current_task()
        assert task is not None
        return task.cancelling()

    assert await asyncio.get_running_loop().create_task(run()) == 0
    assert swallowed.is_set()


async def test_a_try_that_ends_in_time_leaves_nothing_for_the_timer() -> None:
    """Leaving removes the try from the ledger: the timer can never cancel what the task does next."""
    timeout = Timeout(30)
    timed = timeout(lambda ctx: asyncio.sleep(0))
    for _ in range(100):
        await timed(_Ctx())
    (ledger,) = timeout._ledgers.values()
    assert len(ledger) == 0  # neither running nor remembered as expired


async def test_run_wraps_any_coroutine_function_with_the_same_deadline() -> None:
    async def hangs() -> None:
        await asyncio.Event().wait()

    async def quick(x: int) -> int:
        await asyncio.sleep(0)
        return x * 2

    timeout = Timeout(0.05)
    assert await timeout.run(quick, 21) == 42
    with pytest.raises(HandlerTimeoutError):
        await timeout.run(hangs)
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0


def test_one_middleware_serves_one_loop_after_another_and_keeps_none_alive() -> None:
    """A handler's middleware outlives a loop (tests, restarts): each loop gets its own
    ledger, and a finished loop is not kept alive by the middleware."""
    import gc
    import weakref

    timed = _timed(0.05, _hangs_until_cancelled)
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def one_round() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        with pytest.raises(HandlerTimeoutError):
            await timed(_Ctx())

    asyncio.run(one_round())
    asyncio.run(one_round())
    gc.collect()
    assert loops[0]() is None


async def _hangs_until_cancelled(ctx: object) -> None:
    await asyncio.Event().wait()


def test_a_timer_still_set_when_its_loop_ends_does_not_keep_the_loop_alive() -> None:
    """Tries that finish early leave the ledger's one timer set (for the deadline of a try
    long gone); that timer belongs to the loop, and must not make the middleware hold it."""
    import gc
    import weakref

    timed = _timed(3600, _returns)
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def one_round() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        await timed(_Ctx())

    asyncio.run(one_round())
    asyncio.run(one_round())
    gc.collect()
    assert loops[0]() is None


async def _returns(ctx: object) -> None:
    return None
