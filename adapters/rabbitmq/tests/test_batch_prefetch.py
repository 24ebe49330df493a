"""A batch handler's prefetch (``concurrency x max_size``) past AMQP's 16-bit limit."""

from __future__ import annotations

import asyncio
import uuid

from meshlink import Batch, Mesh


async def test_a_batch_prefetch_over_the_amqp_limit_is_capped(rabbit_url: str) -> None:
    """16 x 5000 = 80,000 does not fit AMQP's ``prefetch_count`` (0-65,535): before the cap,
    ``Mesh.start()`` failed with a bare ``TypeError: Short unsigned integer range`` from the
    AMQP encoder. Now the channel's prefetch is capped and the handler consumes."""
    suffix = uuid.uuid4().hex[:8]
    mesh = Mesh(rabbit_url, service=f"big-{suffix}")
    got = asyncio.Event()

    @mesh.handler(f"big-{suffix}", batch=Batch(max_size=5000, max_wait=0.01), concurrency=16)
    async def store(rows: list[dict[str, int]]) -> None:
        got.set()

    try:
        async with asyncio.timeout(30):
            await mesh.start()
            await mesh.publish(f"big-{suffix}", {"n": 1})
            await got.wait()
    finally:
        await mesh.stop()
