"""meshlink on Kafka vs raw aiokafka: publish and consume throughput, same run, same settings.

meshlink is measured through what a user writes, nothing lower:

* publish: ``await mesh.publish(destination, order, key=...)``, pipelined by
  gathering ``--window`` publishes at a time, and ``await mesh.publish_many(destination,
  window, key=...)`` of the same windows;
* consume: a ``Mesh`` handler ``async def handle(order: Order) -> None``, once
  with every default policy (retry with its retry topic, 60 s timeout, bulkhead
  = prefetch) and once bare (``retry=Retry.none(), timeout=None``), so that the
  cost of the policy stack shows. ``concurrency`` is ``--prefetch`` for both.
  And a batch handler ``async def handle(batch: list[Order]) -> None`` with
  ``batch=Batch(max_size=--batch)`` and every default policy. meshlink commits
  after processing (at-least-once; batched commits of the settled offsets).

Raw aiokafka: a producer with ``acks=all`` sending the same windows (every send
of a window handed to the client, then the window's futures gathered); a
consumer in a fresh group that decodes every 256-byte JSON body into the same
pydantic model and commits once per fetched batch. A second raw line,
"raw+env", also builds and sends / rebuilds meshlink's envelope (``codec.envelope``
and ``Message.header_pairs`` / ``Message.from_headers``, as the adapter does), to
show how much of the difference is the wire format rather than the transport.

Every side uses 3 partitions, the same keys (1,000 distinct) and the same
consumer settings. Each round runs every side on fresh, uniquely named topics,
in an order that rotates from round to round so machine drift hits every side.
Group joins and Mesh start/stop are outside the timed regions: each consumer
joins first and is paused while its backlog is published, so consuming is
measured alone, from resume to the last message. The median round of each line
is reported: msg/s (wall clock), the ratio to raw aiokafka and to raw+env, and
CPU microseconds per message (``time.process_time``, this process only; the
broker runs in its own process).

    .venv/bin/python benchmarks/kafka_throughput.py [--messages 50000] [--rounds 5]

50,000 messages per side by default: the consume of 20,000 lasts about 0.1 s for raw
aiokafka, short enough for one slow fetch at the start or the end to move a round's
figure by a tenth. The prepared orders are frozen out of the garbage collector's reach
(``gc.freeze()``, see ``run``) unless ``--no-freeze``: they are the benchmark's fixture,
and a full collection scanning them would be charged to whichever side set it off.

Uses ``MESHLINK_KAFKA_BOOTSTRAP`` if set, else starts a local broker
(``scripts/kafka_broker.py``). ``fetch_max_wait_ms=10`` and a 6 s session
timeout (for every side) only work around the test broker's slow fetch answers
and group joins (see ``../shared/services.md``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import logging
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from pydantic import BaseModel

from meshlink import Batch, Mesh, Message, Retry
from meshlink.codec import envelope as envelope_of
from meshlink.logs import configure
from meshlink_kafka import KafkaTransport

PARTITIONS = 3
GROUP = "bench"
KEYS = 1_000
GROUP_OPTIONS: dict[str, Any] = {
    "session_timeout_ms": 6_000,
    "heartbeat_interval_ms": 1_000,
    "fetch_max_wait_ms": 10,
}
MESHLINK_OPTIONS: dict[str, Any] = {
    **GROUP_OPTIONS,
    "rebalance_timeout_ms": 6_000,
    "request_timeout_ms": 12_000,
    "drain_timeout": 3.0,
    "partitions": PARTITIONS,
}

RAW_PUBLISH = "publish  raw aiokafka"
ENV_PUBLISH = "publish  raw+env"
MESH_PUBLISH = "publish  mesh.publish"
MANY_PUBLISH = "publish  publish_many"
RAW_CONSUME = "consume  raw aiokafka"
ENV_CONSUME = "consume  raw+env"
DEFAULT_CONSUME = "consume  handler, default policies"
BARE_CONSUME = "consume  handler, bare"
BATCH_CONSUME = "consume  batch handler, default policies"
LINES = (
    RAW_PUBLISH,
    ENV_PUBLISH,
    MESH_PUBLISH,
    MANY_PUBLISH,
    RAW_CONSUME,
    ENV_CONSUME,
    DEFAULT_CONSUME,
    BARE_CONSUME,
    BATCH_CONSUME,
)


class Order(BaseModel):
    """The benchmark payload (its JSON is 256 bytes)."""

    order_id: int
    customer: str
    amount: float
    currency: str
    note: str


def customer(order: Order) -> str:
    """The key of an order."""
    return order.customer


def make_order(i: int) -> Order:
    order = Order(order_id=i, customer=f"customer-{i % KEYS:04d}", amount=i * 0.01, currency="EUR", note="")
    pad = 256 - len(order.model_dump_json())
    return order.model_copy(update={"note": "x" * max(0, pad)})


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


# -- raw aiokafka ------------------------------------------------------------------------


class _Assigned(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.event = asyncio.Event()

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        pass

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        if assigned:
            self.event.set()


async def run_raw(
    bootstrap: str, topic: str, orders: list[Order], args: argparse.Namespace, *, envelope: bool
) -> dict[str, Result]:
    """Raw aiokafka; with ``envelope`` it also sends and rebuilds meshlink's envelope headers."""
    n = len(orders)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=f"raw-{uuid.uuid4().hex[:6]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=500,
        **GROUP_OPTIONS,
    )
    listener = _Assigned()
    consumer.subscribe([topic], listener=listener)
    await consumer.start()
    # meshlink's producer settings (linger_ms=0, aiokafka's default too, and 64 KiB batches)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0, max_batch_size=65_536)
    await producer.start()
    try:
        # join the group, then hold the partitions while the backlog is published
        while not listener.event.is_set():
            await consumer.getmany(timeout_ms=100)
        consumer.pause(*consumer.assignment())

        async def publish() -> None:
            for chunk in windows(orders, args.window):
                futures = []
                for order in chunk:
                    key = order.customer
                    headers = None
                    if envelope:
                        msg = envelope_of(order, source="bench", key=key)
                        body = msg.body
                        headers = msg.header_pairs()
                    else:
                        body = order.model_dump_json().encode()
                    futures.append(await producer.send(topic, body, key=key.encode(), headers=headers))
                await asyncio.gather(*futures)

        published = await timed(publish, n)

        async def consume() -> None:
            consumer.resume(*consumer.assignment())
            seen = 0
            while seen < n:
                batches = await consumer.getmany(timeout_ms=1_000, max_records=500)
                for records in batches.values():
                    for rec in records:
                        if envelope:
                            key = rec.key.decode() if rec.key is not None else None
                            message = Message.from_headers(rec.headers, rec.value, key=key)
                            Order.model_validate_json(message.body)
                        else:
                            Order.model_validate_json(rec.value)
                        seen += 1
                if batches:
                    await consumer.commit()  # sequential processing: the fetched position is done

        consumed = await timed(consume, n)
    finally:
        await producer.stop()
        await consumer.stop()
    if envelope:
        return {ENV_PUBLISH: published, ENV_CONSUME: consumed}
    return {RAW_PUBLISH: published, RAW_CONSUME: consumed}


# -- meshlink ------------------------------------------------------------------------------


async def run_mesh(
    bootstrap: str, topic: str, orders: list[Order], args: argparse.Namespace, *, kind: str
) -> dict[str, Result]:
    """One Mesh: publish the backlog while its handler is paused, then consume it.

    ``kind``: ``default`` (every default policy; published with gathered ``mesh.publish``),
    ``bare`` (no retry, no timeout; ``publish_many``) or ``batch`` (a batch handler with every
    default policy, up to ``--batch`` per call; ``publish_many``, publish not reported)."""
    n = len(orders)
    mesh = Mesh(f"kafka://{bootstrap}", service="bench", transport_options=MESHLINK_OPTIONS)
    done = asyncio.Event()
    count = 0

    def seen(k: int) -> None:
        nonlocal count
        count += k
        if count >= n:
            done.set()

    async def handle(order: Order) -> None:
        seen(1)

    async def handle_batch(batch: list[Order]) -> None:
        seen(len(batch))

    if kind == "batch":
        mesh.handler(topic, group=GROUP, batch=Batch(max_size=args.batch))(handle_batch)
    elif kind == "bare":
        mesh.handler(topic, group=GROUP, concurrency=args.prefetch, retry=Retry.none(), timeout=None)(handle)
    else:
        mesh.handler(topic, group=GROUP, concurrency=args.prefetch)(handle)

    await mesh.start()
    try:
        subscriptions = [s for d in mesh.dispatchers for s in d.subscriptions]
        for s in subscriptions:
            await s.pause()

        async def publish() -> None:
            for chunk in windows(orders, args.window):
                await asyncio.gather(*(mesh.publish(topic, o, key=o.customer) for o in chunk))

        async def publish_many() -> None:
            for chunk in windows(orders, args.window):
                await mesh.publish_many(topic, chunk, key=customer)

        async def consume() -> None:
            for s in subscriptions:
                await s.resume()
            await done.wait()

        published = await timed(publish if kind == "default" else publish_many, n)
        consumed = await timed(consume, n)
    finally:
        await mesh.stop()
    if kind == "batch":
        return {BATCH_CONSUME: consumed}
    if kind == "bare":
        return {MANY_PUBLISH: published, BARE_CONSUME: consumed}
    return {MESH_PUBLISH: published, DEFAULT_CONSUME: consumed}


# -- the run ---------------------------------------------------------------------------------


async def create_topic(bootstrap: str, topic: str) -> None:
    """Create ``topic`` with the benchmark's partition count (raw sides do not create topics)."""
    transport = KafkaTransport(f"kafka://{bootstrap}", **MESHLINK_OPTIONS)
    await transport.connect()
    try:
        await transport.declare(topic)
    finally:
        await transport.close()


async def run(bootstrap: str, args: argparse.Namespace) -> None:
    n = args.messages
    orders = [make_order(i) for i in range(n)]
    size = len(orders[0].model_dump_json())
    if not args.no_freeze:
        # The prepared orders (three collector-tracked objects each) are the benchmark's
        # fixture, not part of any side: frozen, a full collection does not scan them
        # (otherwise whichever side happens to set off full collections pays for them).
        gc.collect()
        gc.freeze()

    async def raw(topic: str) -> dict[str, Result]:
        await create_topic(bootstrap, topic)
        return await run_raw(bootstrap, topic, orders, args, envelope=False)

    async def raw_env(topic: str) -> dict[str, Result]:
        await create_topic(bootstrap, topic)
        return await run_raw(bootstrap, topic, orders, args, envelope=True)

    async def default(topic: str) -> dict[str, Result]:
        return await run_mesh(bootstrap, topic, orders, args, kind="default")

    async def bare(topic: str) -> dict[str, Result]:
        return await run_mesh(bootstrap, topic, orders, args, kind="bare")

    async def batch(topic: str) -> dict[str, Result]:
        return await run_mesh(bootstrap, topic, orders, args, kind="batch")

    sides: list[Callable[[str], Awaitable[dict[str, Result]]]] = [raw, raw_env, default, bare, batch]
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
        f"\n{n} messages of {size} bytes, {PARTITIONS} partitions, acks=all, {KEYS} keys, "
        f"prefetch {args.prefetch}, window {args.window}, median of {args.rounds} rounds"
    )
    print(f"{'':36s} {'msg/s':>8s} {'vs raw':>7s} {'vs raw+env':>11s} {'CPU µs/msg':>11s}")
    for line in LINES:
        rate, cpu = median(line)
        kind = "publish" if line.startswith("publish") else "consume"
        raw_rate = median(RAW_PUBLISH if kind == "publish" else RAW_CONSUME)[0]
        env_rate = median(ENV_PUBLISH if kind == "publish" else ENV_CONSUME)[0]
        print(f"{line:36s} {rate:8.0f} {rate / raw_rate:6.2f}x {rate / env_rate:10.2f}x {cpu:11.1f}")


def _broker_module() -> Any:
    path = Path(__file__).resolve().parents[1] / "scripts" / "kafka_broker.py"
    spec = importlib.util.spec_from_file_location("kafka_broker", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["kafka_broker"] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prefetch", type=int, default=256)
    parser.add_argument("--window", type=int, default=1_000)
    parser.add_argument("--batch", type=int, default=500, help="max_size of the batch handler")
    parser.add_argument(
        "--no-freeze", action="store_true", help="leave the prepared orders to the garbage collector"
    )
    args = parser.parse_args()
    configure("WARNING")
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    bootstrap = os.environ.get("MESHLINK_KAFKA_BOOTSTRAP")
    if bootstrap:
        asyncio.run(run(bootstrap, args))
        return
    with _broker_module().LocalBroker.start() as broker:
        asyncio.run(run(broker.bootstrap, args))


if __name__ == "__main__":
    main()
