"""Soak: meshes joining and leaving a memory:// group mid-stream lose nothing (make chaos)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from meshlink import Event, Mesh, Message, MessageHandled
from meshlink.transport import MemoryTransport, Outgoing

pytestmark = pytest.mark.chaos


async def test_churning_consumers_lose_nothing_and_only_redeliver_unfinished(memory_url: str) -> None:
    n = 20_000
    rng = random.Random(7)
    finished: Counter[str] = Counter()  # handler returned (the mesh then acks, uncancellably)
    started: Counter[str] = Counter()
    progress = asyncio.Event()

    def on_event(event: Event) -> None:
        if isinstance(event, MessageHandled):
            finished[event.message.id] += 1
            progress.set()

    async def until(count: int) -> None:
        async with asyncio.timeout(120):
            while len(finished) < count:
                progress.clear()
                await progress.wait()

    def make_mesh() -> Mesh:
        mesh = Mesh(memory_url, service="soak", drain_timeout=0)  # cancel whatever runs at stop
        mesh.add_listener(on_event)

        @mesh.handler("jobs", concurrency=8)
        async def work(message: Message) -> None:
            started[message.id] += 1
            for _ in range(rng.randrange(40)):
                await asyncio.sleep(0)

        return mesh

    publisher = MemoryTransport(memory_url)
    await publisher.connect()
    await publisher.declare("jobs", "soak")
    sent = [Message(body=b"{}", key=f"k{i % 50}") for i in range(n)]
    await publisher.publish_many([Outgoing(destination="jobs", message=m) for m in sent])

    meshes = [make_mesh() for _ in range(3)]
    for mesh in meshes:
        await mesh.start()
    for step in range(1, 10):  # every 2,000 finished messages, one member leaves and a new one joins
        await until(step * 2_000)
        leaving = meshes.pop(rng.randrange(len(meshes)))
        await leaving.stop()
        joining = make_mesh()
        await joining.start()
        meshes.append(joining)
    await until(n)
    for mesh in meshes:
        await mesh.stop()
    await publisher.close()

    interrupted = sum(started.values()) - n
    print(f"\n{n} messages, 9 members replaced, {interrupted} handler runs interrupted and redelivered")
    assert set(finished) == {m.id for m in sent}, "a message was lost"
    assert max(finished.values()) == 1, "a message that finished was handled again"
    assert interrupted > 0, "no handler was interrupted: the scenario did not exercise the drain"
