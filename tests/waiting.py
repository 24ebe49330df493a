"""Waiting on a condition in tests (importable: ``tests/conftest.py`` puts this folder on the path)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Await ``condition()``, re-checked every few milliseconds (for state no event reports);
    fail, naming ``what``, if it is not true within ``timeout`` (a hang guard, not a threshold)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"{what}: never happened within {timeout}s")
        await asyncio.sleep(0.005)
