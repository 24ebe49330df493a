"""A service for the SIGTERM test: it feeds itself N messages and prints progress.

Lines on stdout: ``started <n>`` when a handler starts, ``done <n>`` when it
finishes, and at exit ``left <ready> <unsettled>`` from the broker's books.
"""

from __future__ import annotations

import asyncio
import os

from meshlink import Mesh
from meshlink.transport import MemoryBroker, MemoryTransport

N = int(os.environ.get("DRAIN_N", "40"))
mesh = Mesh("memory://drain", service="drain", drain_timeout=30)
broker: list[MemoryBroker] = []
release = asyncio.Event()


@mesh.handler("work", concurrency=4)
async def work(job: dict[str, int]) -> None:
    print(f"started {job['n']}", flush=True)
    # each handler needs the next loop turns to finish; SIGTERM arrives while some run
    for _ in range(50):
        await asyncio.sleep(0)
    print(f"done {job['n']}", flush=True)


@mesh.on_start
async def feed() -> None:
    assert isinstance(mesh.transport, MemoryTransport)
    broker.append(mesh.transport.broker)
    for n in range(N):
        await mesh.publish("work", {"n": n})


@mesh.on_stop
async def report() -> None:
    b = broker[0]
    print(f"left {b.depth('work', 'drain')} {b.unsettled('work', 'drain')}", flush=True)
