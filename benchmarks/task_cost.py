"""What running each message's handler in its own asyncio task costs, measured alone.

A dispatcher that runs handlers concurrently gives each message a task (its own
``contextvars`` context, its own ``current_task()`` for ``asyncio.timeout()``).
This script measures, for a handler that returns at once, CPU microseconds per call:

* ``await handler(m)`` in one loop (no concurrency, no isolation);
* one task per message, 256 in flight (what meshlink's dispatcher does);
* the coroutine's first step run by hand in a copied context (what an eager task
  does; not safe on Python 3.11, where ``current_task()`` would be the caller's).

    .venv/bin/python benchmarks/task_cost.py [N]
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any


async def handler(message: int) -> None:
    return None


async def direct(n: int) -> None:
    for i in range(n):
        await handler(i)


async def task_each(n: int) -> None:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    left = n
    tasks: set[asyncio.Task[None]] = set()  # kept, as a dispatcher keeps its tasks

    async def run(i: int) -> None:
        nonlocal left
        await handler(i)
        tasks.discard(asyncio.current_task())
        left -= 1
        if left == 0:
            done.set()

    for i in range(n):
        tasks.add(loop.create_task(run(i)))
        if i % 256 == 255:
            await asyncio.sleep(0)  # 256 in flight, as with a prefetch of 256
    await done.wait()


async def stepped(n: int) -> None:
    for i in range(n):
        coro = handler(i)
        try:
            contextvars.copy_context().run(coro.send, None)
        except StopIteration:
            pass
        else:  # pragma: no cover - the handler never suspends
            raise AssertionError("handler suspended")


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    ways: list[tuple[str, Callable[[int], Coroutine[Any, Any, None]]]] = [
        ("await handler() directly", direct),
        ("one task per message", task_each),
        ("first step by hand, copied context", stepped),
    ]
    for name, way in ways:
        cpu = time.process_time()
        asyncio.run(way(n))
        print(f"{name:36s} {(time.process_time() - cpu) / n * 1e6:6.2f} CPU µs/message")


if __name__ == "__main__":
    main()
