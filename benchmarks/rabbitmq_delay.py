"""How late delayed messages arrive on stock RabbitMQ (TTL queues, no plugin).

For each delay, publishes ``--count`` messages spread over time, consumes them and
measures lateness = arrival - (publish returned + delay). A negative value would be
an early delivery (the contract forbids it); target: within 10% or 100 ms.

    .venv/bin/python benchmarks/rabbitmq_delay.py [--count 50] [--delays 0.1,0.5,1,2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import uuid

import aio_pika

from meshlink.logs import configure
from meshlink.message import Message
from meshlink.transport.base import Delivery, SubscriptionSpec
from meshlink_rabbitmq import RabbitTransport

URL = "amqp://guest:guest@127.0.0.1:5672/"


async def measure(t: RabbitTransport, delay: float, count: int) -> list[float]:
    dest = f"delaybench-{uuid.uuid4().hex[:8]}"
    loop = asyncio.get_running_loop()
    due: dict[str, float] = {}
    late: list[float] = []
    done = asyncio.Event()

    async def handle(d: Delivery) -> None:
        late.append(loop.time() - due[d.message.id])
        await d.ack()
        if len(late) >= count:
            done.set()

    sub = await t.subscribe(SubscriptionSpec(destination=dest, group="g", prefetch=64), handle)
    for i in range(count):
        m = Message(body=str(i).encode())
        due[m.id] = float("inf")  # not due before the publish returned
        await t.publish(dest, m, delay=delay)
        due[m.id] = loop.time() + delay
        await asyncio.sleep(delay / count)  # spread publishes over one delay period
    await asyncio.wait_for(done.wait(), delay * 3 + 30)
    await sub.stop()
    conn = await aio_pika.connect(URL)
    ch = await conn.channel()
    await ch.queue_delete(f"{dest}.g")
    await ch.exchange_delete(dest)
    await conn.close()
    return late


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--delays", default="0.1,0.5,1,2,5")
    args = parser.parse_args()
    configure("WARNING")
    t = RabbitTransport(URL)
    await t.connect()
    print(
        f"{'delay s':>8s} {'n':>4s} {'early':>5s} {'min ms':>7s} {'p50 ms':>7s} {'p99 ms':>7s} {'max ms':>7s}"
    )
    try:
        for delay in (float(x) for x in args.delays.split(",")):
            late = sorted(x * 1000 for x in await measure(t, delay, args.count))
            p99 = late[min(len(late) - 1, int(len(late) * 0.99))]
            early = sum(1 for x in late if x < 0)
            print(
                f"{delay:8.2f} {len(late):4d} {early:5d} {late[0]:7.1f} "
                f"{statistics.median(late):7.1f} {p99:7.1f} {late[-1]:7.1f}"
            )
    finally:
        await t.close()


if __name__ == "__main__":
    asyncio.run(main())
