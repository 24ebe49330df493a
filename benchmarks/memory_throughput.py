"""Publish and handle N messages through a Mesh on memory://, against the bare transport.

Prints messages/s and CPU µs per message for:
* ``transport``: the memory transport alone, decoding each body into the model and acking;
* ``mesh``: a Mesh with a pydantic-model handler and the default pipeline
  (settle → decode → handler, per-key ordering, events, structlog context).

    python benchmarks/memory_throughput.py [N]
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from pydantic import BaseModel

from meshlink import Mesh, Message, Retry
from meshlink.logs import configure
from meshlink.transport import Delivery, MemoryTransport, Outgoing, SubscriptionSpec

BODY_FIELDS = {
    "order_id": "o-000000",
    "customer": "c" * 40,
    "items": ["sku-1", "sku-2", "sku-3"],
    "note": "x" * 120,
}


class Order(BaseModel):
    order_id: str
    customer: str
    items: list[str]
    note: str
    amount: float


def payload(i: int) -> Order:
    return Order(amount=float(i), **BODY_FIELDS)  # type: ignore[arg-type]


class Meter:
    def __enter__(self) -> Meter:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu

    def line(self, label: str, n: int) -> str:
        return f"{label:<28} {n / self.wall:>10,.0f} msg/s   {self.cpu / n * 1e6:>7.1f} CPU µs/msg"


async def bench_transport(n: int) -> tuple[Meter, Meter]:
    t = MemoryTransport("memory://bench-raw")
    await t.connect()
    done = asyncio.Event()
    count = 0

    async def on_delivery(d: Delivery) -> None:
        nonlocal count
        Order.model_validate_json(d.message.body)
        await d.ack()
        count += 1
        if count == n:
            done.set()

    await t.declare("orders", "g")
    body = payload(0).model_dump_json().encode()
    with Meter() as pub:
        for i in range(n):
            await t.publish("orders", Message(body=body, type="Order", key=f"k{i % 64}"))
    with Meter() as con:
        await t.subscribe(SubscriptionSpec(destination="orders", group="g", prefetch=16), on_delivery)
        await done.wait()
    await t.close()
    return pub, con


async def bench_mesh(n: int, *, bare: bool = False) -> tuple[Meter, Meter, Meter]:
    mesh = Mesh(f"memory://bench-mesh-{bare}", service="bench")
    done = asyncio.Event()
    count = 0
    policies: dict[str, Any] = {"retry": Retry.none(), "timeout": None} if bare else {}

    @mesh.handler("orders", concurrency=16, **policies)
    async def handle(order: Order) -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    # publish first with the handler paused, then consume the backlog, to time each side alone
    async with mesh:
        sub = mesh.dispatchers[0].subscriptions[0]
        await sub.pause()
        orders = [payload(i) for i in range(n)]
        with Meter() as pub:
            for i, order in enumerate(orders):
                await mesh.publish("orders", order, key=f"k{i % 64}")
        with Meter() as con:
            await sub.resume()
            await done.wait()
        count = 0
        done.clear()
        batch = [
            Outgoing(destination="orders", message=mesh.message(o, key=f"k{i % 64}"))
            for i, o in enumerate(orders)
        ]
        with Meter() as both:
            await mesh.transport.publish_many(batch)
            await done.wait()
    return pub, con, both


async def main(n: int) -> None:
    configure("WARNING")
    t_pub, t_con = await bench_transport(n)
    m_pub, m_con, m_both = await bench_mesh(n)
    _, b_con, _ = await bench_mesh(n, bare=True)
    print(f"memory:// — {n:,} messages, {len(payload(0).model_dump_json())}-byte JSON bodies, pydantic model")
    print(t_pub.line("transport publish", n))
    print(t_con.line("transport consume+decode", n))
    print(m_pub.line("mesh publish (encode)", n))
    print(b_con.line("mesh handle (bare handler)", n))
    print(m_con.line("mesh handle (default stack)", n))
    print(m_both.line("mesh publish_many+handle", n))
    print(f"policy stack (retry, timeout, bulkhead) adds {(m_con.cpu - b_con.cpu) / n * 1e6:.1f} CPU µs/msg")
    print(
        f"ratios mesh/transport: publish {t_pub.wall / m_pub.wall:.2f}x, "
        f"consume {t_con.wall / m_con.wall:.2f}x"
    )


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 50_000))
