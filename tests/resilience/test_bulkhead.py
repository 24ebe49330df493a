"""Bulkhead: the limit, the order of waiters, and slots kept through cancellations."""

from __future__ import annotations

import asyncio

import pytest

from meshlink import Bulkhead
from meshlink.errors import ConfigurationError


async def _settle() -> None:
    """Let every ready callback run (no wall-clock waiting)."""
    for _ in range(10):
        await asyncio.sleep(0)


def test_a_limit_below_one_fails_naming_the_setting() -> None:
    with pytest.raises(ConfigurationError, match=r"bulkhead\.concurrency"):
        Bulkhead(0)


async def test_never_more_than_the_limit_and_waiters_start_in_arrival_order() -> None:
    bulkhead = Bulkhead(2)
    gates = {i: asyncio.Event() for i in range(6)}
    started: list[int] = []

    async def work(i: int) -> int:
        started.append(i)
        await gates[i].wait()
        return i

    calls = [asyncio.create_task(bulkhead.run(work, i)) for i in range(6)]
    await _settle()
    assert started == [0, 1]
    assert bulkhead.running == 2
    assert bulkhead.saturated
    for i in (1, 0, 2, 3):
        gates[i].set()
        await _settle()
        assert bulkhead.running == 2
    assert started == [0, 1, 2, 3, 4, 5]
    gates[4].set()
    gates[5].set()
    assert await asyncio.gather(*calls) == list(range(6))
    assert bulkhead.running == 0
    assert bulkhead.peak == 2


async def test_the_middleware_and_run_share_the_slots() -> None:
    bulkhead = Bulkhead(1)
    gate = asyncio.Event()
    seen: list[str] = []

    async def handler(ctx: object) -> None:
        seen.append(str(ctx))
        await gate.wait()

    limited = bulkhead(handler)
    first = asyncio.create_task(limited("middleware"))
    second = asyncio.create_task(bulkhead.run(handler, "run"))
    await _settle()
    assert seen == ["middleware"]
    gate.set()
    await asyncio.gather(first, second)
    assert seen == ["middleware", "run"]
    assert bulkhead.running == 0


async def test_a_waiter_cancelled_while_waiting_takes_no_slot() -> None:
    bulkhead = Bulkhead(1)
    gate = asyncio.Event()
    ran: list[int] = []

    async def work(i: int) -> None:
        ran.append(i)
        await gate.wait()

    holder = asyncio.create_task(bulkhead.run(work, 0))
    waiter = asyncio.create_task(bulkhead.run(work, 1))
    last = asyncio.create_task(bulkhead.run(work, 2))
    await _settle()
    waiter.cancel()
    await _settle()
    gate.set()
    await asyncio.gather(holder, last)
    assert waiter.cancelled()
    assert ran == [0, 2]
    assert bulkhead.running == 0


async def test_a_waiter_cancelled_after_being_handed_a_slot_passes_it_on() -> None:
    bulkhead = Bulkhead(1)
    ran: list[int] = []

    async def work(i: int) -> None:
        ran.append(i)

    await bulkhead._enter()  # this test holds the slot, so that it can free it at a chosen step
    handed = asyncio.create_task(bulkhead.run(work, 1))
    last = asyncio.create_task(bulkhead.run(work, 2))
    await _settle()
    bulkhead._leave()  # the slot goes to `handed`, which has not resumed yet ...
    handed.cancel()  # ... and is cancelled in the same step
    await _settle()
    assert handed.cancelled()
    assert last.done()
    assert ran == [2]
    assert bulkhead.running == 0
    assert bulkhead.peak == 1


async def test_a_waiter_cancelled_just_before_a_slot_frees_loses_nothing() -> None:
    """The slot is freed after the waiter's cancel but before the waiter has run: the
    freed slot skips it, and its own clean-up finds it already gone."""
    bulkhead = Bulkhead(1)
    ran: list[int] = []

    async def work(i: int) -> None:
        ran.append(i)

    await bulkhead._enter()
    cancelled = asyncio.create_task(bulkhead.run(work, 1))
    last = asyncio.create_task(bulkhead.run(work, 2))
    await _settle()
    cancelled.cancel()
    bulkhead._leave()  # same step: the cancelled waiter has not run its clean-up yet
    await _settle()
    assert cancelled.cancelled()
    assert last.done()
    assert last.exception() is None
    assert ran == [2]
    assert bulkhead.running == 0


async def test_a_failing_call_frees_its_slot() -> None:
    bulkhead = Bulkhead(1)

    async def boom() -> None:
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        await bulkhead.run(boom)
    assert bulkhead.running == 0
    await bulkhead.run(asyncio.sleep, 0)
