"""meshlink on RabbitMQ vs raw aio-pika: publish and consume throughput, same run, same settings.

Both sides: publisher confirms on, persistent, mandatory, the same ~256-byte JSON
body (a pydantic model) and the same CloudEvents header set on the wire,
publishes pipelined in windows of ``--window``; consumers decode every body into
the pydantic model and ack it, with the same prefetch. Rounds alternate raw and
meshlink so drift in the machine hits both; the best round of each is reported,
with wall-clock msgs/s, the meshlink/raw ratio and CPU microseconds per message.

    .venv/bin/python benchmarks/rabbitmq_throughput.py [--messages 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import aio_pika
from pydantic import BaseModel

from meshlink.message import Message
from meshlink.transport.base import Delivery, Outgoing, SubscriptionSpec
from meshlink_rabbitmq import RabbitTransport

URL = "amqp://guest:guest@127.0.0.1:5672/"


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


async def timed(fn: Callable[[], Awaitable[None]], n: int) -> tuple[float, float]:
    """Return (msgs/s, CPU µs per message) of ``fn`` handling ``n`` messages."""
    wall, cpu = time.perf_counter(), time.process_time()
    await fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return n / wall, cpu / n * 1e6


class Raw:
    def __init__(self, dest: str, prefetch: int, window: int) -> None:
        self.dest, self.prefetch, self.window = dest, prefetch, window

    async def setup(self) -> None:
        self.conn = await aio_pika.connect_robust(URL)
        self.pub = await self.conn.channel(publisher_confirms=True, on_return_raises=True)
        self.exchange = await self.pub.declare_exchange(self.dest, "topic", durable=True)
        queue = await self.pub.declare_queue(f"{self.dest}.g", durable=True)
        await queue.bind(self.exchange, "#")

    async def publish(self, orders: list[Order]) -> None:
        for i in range(0, len(orders), self.window):
            await asyncio.gather(
                *(
                    self.exchange.publish(raw_message(o), "", mandatory=True)
                    for o in orders[i : i + self.window]
                )
            )

    async def consume(self, n: int) -> None:
        channel = await self.conn.channel()
        await channel.set_qos(prefetch_count=self.prefetch)
        queue = await channel.declare_queue(f"{self.dest}.g", durable=True)
        done = asyncio.Event()
        count = 0

        async def on_message(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal count
            Order.model_validate_json(msg.body)
            await msg.ack()
            count += 1
            if count >= n:
                done.set()

        tag = await queue.consume(on_message)
        await done.wait()
        await queue.cancel(tag)
        await channel.close()

    async def teardown(self) -> None:
        await self.pub.queue_delete(f"{self.dest}.g")
        await self.pub.exchange_delete(self.dest)
        await self.conn.close()


class Meshlink:
    def __init__(self, dest: str, prefetch: int, window: int) -> None:
        self.dest, self.prefetch, self.window = dest, prefetch, window

    async def setup(self) -> None:
        self.t = RabbitTransport(URL)
        await self.t.connect()
        await self.t.declare(self.dest, "g")

    async def publish(self, orders: list[Order]) -> None:
        for i in range(0, len(orders), self.window):
            await self.t.publish_many(
                [
                    Outgoing(
                        destination=self.dest,
                        message=Message(body=o.model_dump_json().encode(), type="Order", source="bench"),
                    )
                    for o in orders[i : i + self.window]
                ]
            )

    async def consume(self, n: int) -> None:
        done = asyncio.Event()
        count = 0

        async def handle(d: Delivery) -> None:
            nonlocal count
            Order.model_validate_json(d.message.body)
            await d.ack()
            count += 1
            if count >= n:
                done.set()

        sub = await self.t.subscribe(
            SubscriptionSpec(destination=self.dest, group="g", prefetch=self.prefetch), handle
        )
        await done.wait()
        await sub.stop()

    async def teardown(self) -> None:
        await self.t.close()
        conn = await aio_pika.connect(URL)
        ch = await conn.channel()
        await ch.queue_delete(f"{self.dest}.g")
        await ch.exchange_delete(self.dest)
        await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prefetch", type=int, default=256)
    parser.add_argument("--window", type=int, default=1000)
    args = parser.parse_args()
    n = args.messages
    orders = [make_order(i) for i in range(n)]
    size = len(orders[0].model_dump_json())
    best: dict[tuple[str, str], tuple[float, float]] = {}
    for r in range(args.rounds):
        for name, cls in (("raw aio-pika", Raw), ("meshlink", Meshlink)):
            side = cls(f"bench-{uuid.uuid4().hex[:8]}", args.prefetch, args.window)
            await side.setup()
            try:
                pub = await timed(lambda s=side: s.publish(orders), n)  # type: ignore[misc]
                con = await timed(lambda s=side: s.consume(n), n)  # type: ignore[misc]
            finally:
                await side.teardown()
            print(f"round {r + 1} {name:13s} publish {pub[0]:8.0f} msg/s {pub[1]:6.1f} µs CPU/msg"
                  f" | consume {con[0]:8.0f} msg/s {con[1]:6.1f} µs CPU/msg")  # fmt: skip
            for phase, res in (("publish", pub), ("consume", con)):
                key = (name, phase)
                if key not in best or res[0] > best[key][0]:
                    best[key] = res
    print(
        f"\n{n} messages of {size} bytes, prefetch {args.prefetch}, "
        f"window {args.window}, best of {args.rounds}"
    )
    print(f"{'phase':8s} {'raw msg/s':>10s} {'meshlink':>10s} {'ratio':>6s} {'raw µs':>7s} {'ml µs':>7s}")
    for phase in ("publish", "consume"):
        raw, ml = best[("raw aio-pika", phase)], best[("meshlink", phase)]
        print(f"{phase:8s} {raw[0]:10.0f} {ml[0]:10.0f} {ml[0] / raw[0]:6.2f} {raw[1]:7.1f} {ml[1]:7.1f}")


if __name__ == "__main__":
    asyncio.run(main())
