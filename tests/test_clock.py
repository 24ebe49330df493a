"""FakeClock wakes sleepers in deadline order and only when advanced."""

from __future__ import annotations

import asyncio

from meshlink import FakeClock


async def test_fake_clock_wakes_sleepers_in_deadline_order() -> None:
    clock = FakeClock()
    woke: list[str] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(f"{name}@{clock.monotonic():g}")

    tasks = [asyncio.create_task(sleeper(n, s)) for n, s in (("b", 5), ("a", 2), ("c", 9))]
    await clock.wait_for_sleepers(3)
    await clock.advance(4)
    assert woke == ["a@2"]
    await clock.advance(10)
    await asyncio.gather(*tasks)
    assert woke == ["a@2", "b@5", "c@9"]
    assert clock.monotonic() == 14
