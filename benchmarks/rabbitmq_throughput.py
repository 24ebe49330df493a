"""meshlink on RabbitMQ vs raw aio-pika: publish and consume throughput, same run, same settings.

meshlink is measured through what a user writes, nothing lower:

* publish: ``await mesh.publish(destination, order)``, pipelined by gathering
  ``--window`` publishes at a time, and ``await mesh.publish_many(destination, window)``
  of the same windows;
* consume: a ``Mesh`` handler ``async def handle(order: Order) -> None``, once
  with every default policy (retry with its retry destination, 60 s timeout,
  bulkhead) and once bare (``retry=Retry.none(), timeout=None``), so that the
  cost of the policy stack shows. ``concurrency`` (bulkhead and prefetch) is
  ``--prefetch`` for both.

Raw aio-pika: a confirm channel with ``on_return_raises``, persistent mandatory
publishes gathered in the same windows, carrying the same CloudEvents header set
meshlink puts on the wire; a consumer with the same prefetch that decodes each
body into the same pydantic model and acks it.

Each round runs every side on fresh, uniquely named queues (deleted afterwards),
in an order that rotates from round to round so machine drift hits every side.
Mesh start and stop are outside the timed regions; the backlog is published
while the handler's subscriptions are paused, so consuming is measured alone.
The median round of each line is reported: msgs/s (wall clock), the
meshlink/raw ratio and CPU microseconds per message (``time.process_time``,
this process only; the broker's CPU is not counted).

    .venv/bin/python benchmarks/rabbitmq_throughput.py [--messages 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import aio_pika
from pydantic import BaseModel

from meshlink import Mesh, Retry
from meshlink.logs import configure

URL = "amqp://guest:guest@127.0.0.1:5672/"
GROUP = "bench"

RAW_PUBLISH = "publish  raw aio-pika"
MESH_PUBLISH = "publish  mesh.publish"
MANY_PUBLISH = "publish  publish_many"
RAW_CONSUME = "consume  raw aio-pika"
DEFAULT_CONSUME = "consume  handler, default policies"
BARE_CONSUME = "consume  handler, bare"
LINES = (RAW_PUBLISH, MESH_PUBLISH, MANY_PUBLISH, RAW_CONSUME, DEFAULT_CONSUME, BARE_CONSUME)
BASELINE = {line: RAW_PUBLISH if line.startswith("publish") else RAW_CONSUME for line in LINES}


class Order(BaseModel):
    order_id: str
    customer: str
    amount: float
    currency: str
    items: list[str]
    note: str


def make_order(i: int) -> Order:
    return Order(
        order_id=f"order-{i:08d}",
        customer="customer-0000042",
        amount=1234.5,
        currency="EUR",
        items=["sku-1", "sku-2", "sku-3"],
        note="x" * 120,
    )


Result = tuple[float, float]
"""(messages per second, CPU µs per message)."""


async def timed(fn: Callable[[], Awaitable[None]], n: int) -> Result:
    """Run ``fn`` (which handles ``n`` messages) and measure it."""
    wall, cpu = time.perf_counter(), time.process_time()
    await fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return n / wall, cpu / n * 1e6


def windows(orders: list[Order], size: int) -> list[list[Order]]:
    return [orders[i : i + size] for i in range(0, len(orders), size)]


# -- raw aio-pika ------------------------------------------------------------------------


def raw_message(order: Order) -> aio_pika.Message:
    """What a hand-written aio-pika service sends: the same envelope headers as meshlink."""
    mid = uuid.uuid4().hex
    headers = {
        "ce_specversion": "1.0",
        "ce_id": mid,
        "ce_type": "Order",
        "ce_source": "bench",
        "ce_time": datetime.now(UTC).isoformat(),
        "content-type": "application/json",
        "idempotency-key": mid,
        "attempt": "1",
    }
    return aio_pika.Message(
        order.model_dump_json().encode(),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=mid,
        headers=headers,  # type: ignore[arg-type]
    )


async def run_raw(dest: str, orders: list[Order], args: argparse.Namespace) -> dict[str, Result]:
    n = len(orders)
    conn = await aio_pika.connect_robust(URL)
    try:
        pub = await conn.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await pub.declare_exchange(dest, "topic", durable=True)
        queue = await pub.declare_queue(f"{dest}.{GROUP}", durable=True)
        await queue.bind(exchange, "#")

        async def publish() -> None:
            for chunk in windows(orders, args.window):
                await asyncio.gather(*(exchange.publish(raw_message(o), "", mandatory=True) for o in chunk))

        published = await timed(publish, n)

        channel = await conn.channel()
        await channel.set_qos(prefetch_count=args.prefetch)
        consuming = await channel.declare_queue(f"{dest}.{GROUP}", durable=True)
        done = asyncio.Event()
        count = 0

        async def on_message(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal count
            Order.model_validate_json(msg.body)
            await msg.ack()
            count += 1
            if count >= n:
                done.set()

        async def consume() -> None:
            await consuming.consume(on_message)
            await done.wait()

        consumed = await timed(consume, n)
        await channel.close()
        await pub.queue_delete(f"{dest}.{GROUP}")
        await pub.exchange_delete(dest)
    finally:
        await conn.close()
    return {RAW_PUBLISH: published, RAW_CONSUME: consumed}


# -- meshlink ------------------------------------------------------------------------------


async def run_mesh(
    dest: str, orders: list[Order], args: argparse.Namespace, *, bare: bool
) -> dict[str, Result]:
    """One Mesh: publish the backlog while its handler is paused, then consume it."""
    n = len(orders)
    mesh = Mesh(URL, service="bench")
    done = asyncio.Event()
    count = 0

    async def handle(order: Order) -> None:
        nonlocal count
        count += 1
        if count >= n:
            done.set()

    if bare:
        mesh.handler(dest, group=GROUP, concurrency=args.prefetch, retry=Retry.none(), timeout=None)(handle)
    else:
        mesh.handler(dest, group=GROUP, concurrency=args.prefetch)(handle)

    subscriptions = []
    await mesh.start()
    try:
        subscriptions = [s for d in mesh.dispatchers for s in d.subscriptions]
        for s in subscriptions:
            await s.pause()

        async def publish() -> None:
            for chunk in windows(orders, args.window):
                await asyncio.gather(*(mesh.publish(dest, o) for o in chunk))

        async def publish_many() -> None:
            for chunk in windows(orders, args.window):
                await mesh.publish_many(dest, chunk)

        async def consume() -> None:
            for s in subscriptions:
                await s.resume()
            await done.wait()

        published = await timed(publish_many if bare else publish, n)
        consumed = await timed(consume, n)
    finally:
        await mesh.stop()
        await delete_topology(mesh, dest)
    if bare:
        return {MANY_PUBLISH: published, BARE_CONSUME: consumed}
    return {MESH_PUBLISH: published, DEFAULT_CONSUME: consumed}


async def delete_topology(mesh: Mesh, prefix: str) -> None:
    """Delete the queues and exchanges the mesh declared for this round."""
    explain = getattr(mesh.transport, "explain", None)
    records: list[dict[str, object]] = explain() if explain is not None else []
    conn = await aio_pika.connect(URL)
    try:
        channel = await conn.channel()
        for r in records:
            name = str(r.get("name", ""))
            if not name.startswith(prefix):
                continue  # shared objects (delay exchanges) stay
            if r["kind"] == "queue":
                await channel.queue_delete(name)
            elif r["kind"] == "exchange":
                await channel.exchange_delete(name)
    finally:
        await conn.close()


# -- the run ---------------------------------------------------------------------------------


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prefetch", type=int, default=256)
    parser.add_argument("--window", type=int, default=1000)
    args = parser.parse_args()
    configure("WARNING")
    n = args.messages
    orders = [make_order(i) for i in range(n)]
    size = len(orders[0].model_dump_json())

    async def raw(dest: str) -> dict[str, Result]:
        return await run_raw(dest, orders, args)

    async def default(dest: str) -> dict[str, Result]:
        return await run_mesh(dest, orders, args, bare=False)

    async def bare(dest: str) -> dict[str, Result]:
        return await run_mesh(dest, orders, args, bare=True)

    sides: list[Callable[[str], Awaitable[dict[str, Result]]]] = [raw, default, bare]
    results: dict[str, list[Result]] = {line: [] for line in LINES}
    for r in range(args.rounds):
        order = sides[r % len(sides) :] + sides[: r % len(sides)]
        for side in order:
            for line, res in (await side(f"bench-{uuid.uuid4().hex[:8]}")).items():
                results[line].append(res)
        latest = (f"{results[line][-1][0]:.0f}" for line in LINES)
        print(f"round {r + 1}: " + " / ".join(latest) + " msg/s (lines in the order of the summary)")

    def median(line: str) -> Result:
        rs = results[line]
        return statistics.median(x[0] for x in rs), statistics.median(x[1] for x in rs)

    print(
        f"\n{n} messages of {size} bytes, prefetch {args.prefetch}, window {args.window}, "
        f"median of {args.rounds} rounds"
    )
    print(f"{'':36s} {'msg/s':>8s} {'vs raw':>7s} {'CPU µs/msg':>11s}")
    for line in LINES:
        rate, cpu = median(line)
        ratio = rate / median(BASELINE[line])[0]
        print(f"{line:36s} {rate:8.0f} {ratio:6.2f}x {cpu:11.1f}")


if __name__ == "__main__":
    asyncio.run(main())
