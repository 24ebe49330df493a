"""Outbox relay benchmark: PostgreSQL → broker against publishing directly, statements, latency, inbox CPU.

Run (services of docs/services: PostgreSQL 127.0.0.1:5432 db ``test``, RabbitMQ 127.0.0.1:5672)::

    .venv/bin/python benchmarks/outbox_relay.py [--messages 20000] [--broker amqp://…] [--kafka kafka://host:port]

Kafka: ``--kafka``, else ``MESHLINK_KAFKA_BOOTSTRAP``, else a local Kafka-protocol broker started
by ``scripts/kafka_broker.py`` (``--no-kafka`` skips it). Its URL gets short group timings and
``fetch_max_wait_ms=10`` unless it sets them (the test broker answers fetches and joins slowly).

Figures, each in the same run, for RabbitMQ and Kafka:

1. throughput of publishing N messages directly through the adapter (``publish_many`` in
   chunks of the relay's batch size, until every one is confirmed) and of the relay draining
   the same N rows from PostgreSQL (until every row is confirmed by the broker: the same end
   point), plus the relay end to end (until a consumer received every row);
2. database statements per relayed message (SQLAlchemy ``before_cursor_execute`` on the relay's engine);
3. p99 commit-to-publish latency at 500 msg/s, one message per transaction, relay woken by NOTIFY
   (measured at the consumer: receive time - commit time);
4. CPU per message of one consumer (``time.process_time``) with the SQL inbox (unit of work:
   inbox row + one effect row per message) against the same consumer with the memory idempotency store.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sqlalchemy import Column, Integer, MetaData, String, Table, event
from sqlalchemy.ext.asyncio import AsyncSession

from meshlink import Idempotency, MemoryIdempotencyStore, Mesh, Message, Retry
from meshlink.context import Context
from meshlink.events import Event, MessageHandled
from meshlink.outbox import Outbox, OutboxBatchPublished, Relay
from meshlink.transport.base import Delivery, Outgoing, SubscriptionSpec, Transport
from meshlink.transport.registry import transport_from_url
from meshlink_sqlalchemy import SqlStores

PG = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
#: Kafka settings for the test broker's slow fetch answers and group joins (a URL may override them).
KAFKA_TEST_OPTIONS = {
    "session_timeout_ms": "6000",
    "heartbeat_interval_ms": "1000",
    "rebalance_timeout_ms": "6000",
    "request_timeout_ms": "12000",
    "drain_timeout": "3",
    "fetch_max_wait_ms": "10",
}


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


class Sink:
    """Counts deliveries of one group and records when each arrived."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.arrivals: dict[str, float] = {}
        self.done = asyncio.Event()

    async def take(self, delivery: Delivery) -> None:
        self.arrivals.setdefault(delivery.message.id, time.perf_counter())
        await delivery.ack()
        if len(self.arrivals) >= self.expected:
            self.done.set()


def build(stores: SqlStores, n: int, keys: int) -> list[Message]:
    outbox = Outbox(stores.outbox, source="bench")
    return [outbox.message({"n": i, "pad": "x" * 100}, key=f"k{i % keys}") for i in range(n)]


async def fill(stores: SqlStores, destination: str, n: int, keys: int) -> list[Message]:
    outbox = Outbox(stores.outbox, source="bench")
    messages = build(stores, n, keys)
    for start in range(0, n, 5000):
        async with AsyncSession(stores.engine) as session, session.begin():
            for m in messages[start : start + 5000]:
                await outbox.add(session, destination, m)
    return messages


async def throughput(broker: str, n: int, batch: int) -> dict[str, Any]:
    stores = SqlStores(f"{PG}?table_prefix={unique('bench_')}_")
    await stores.init()
    consumer, publisher = transport_from_url(broker), transport_from_url(broker)
    await consumer.connect()
    await publisher.connect()
    out: dict[str, Any] = {}
    try:
        # direct: the same messages through the adapter, pipelined in the relay's batch size
        direct_dest = unique("bench.direct.")
        sink = Sink(n)
        await consumer.subscribe(
            SubscriptionSpec(destination=direct_dest, group="g", prefetch=2000), sink.take
        )
        messages = build(stores, n, keys=1000)  # the same bodies and keys the relay will send
        started = time.perf_counter()
        for i in range(0, n, batch):
            await publisher.publish_many(
                [Outgoing(destination=direct_dest, message=m) for m in messages[i : i + batch]]
            )
        out["direct_msg_s"] = n / (time.perf_counter() - started)
        await sink.done.wait()

        relay_dest = unique("bench.relay.")
        sink = Sink(n)
        await consumer.subscribe(
            SubscriptionSpec(destination=relay_dest, group="g", prefetch=2000), sink.take
        )
        await fill(stores, relay_dest, n, keys=1000)
        statements = 0

        def count(*_: Any) -> None:
            nonlocal statements
            statements += 1

        confirmed = 0
        all_confirmed = asyncio.Event()

        def on_event(e: Event) -> None:
            nonlocal confirmed
            if isinstance(e, OutboxBatchPublished):
                confirmed += len(e.ids)
                if confirmed >= n:
                    all_confirmed.set()

        # every engine the relay may use: the store's own pool for relay operations, and the
        # application engine (LISTEN connection, and the relay's operations if they shared it)
        engines = {stores.engine.sync_engine, stores.outbox.relay_engine.sync_engine}
        for engine in engines:
            event.listen(engine, "before_cursor_execute", count)
        relay = Relay(stores.outbox, publisher, batch_size=batch, poll_interval="50ms", emit=on_event)
        started = time.perf_counter()
        await relay.start()
        await all_confirmed.wait()  # every row confirmed by the broker, as for direct publishing
        out["relay_msg_s"] = n / (time.perf_counter() - started)
        await sink.done.wait()  # end to end: every row received by the consumer
        out["relay_end_to_end_msg_s"] = n / (time.perf_counter() - started)
        out["relay_vs_direct"] = out["relay_msg_s"] / out["direct_msg_s"]
        await relay.stop()
        for engine in engines:
            event.remove(engine, "before_cursor_execute", count)
        out["statements_per_msg"] = statements / n
        out["statements"] = statements
        await sink.done.wait()
    finally:
        await consumer.close()
        await publisher.close()
        await stores.drop()
        await stores.close()
    return out


async def latency(broker: str, rate: int, seconds: float) -> dict[str, Any]:
    stores = SqlStores(f"{PG}?table_prefix={unique('bench_')}_")
    await stores.init()
    consumer, publisher = transport_from_url(broker), transport_from_url(broker)
    await consumer.connect()
    await publisher.connect()
    destination = unique("bench.latency.")
    total = int(rate * seconds)
    sink = Sink(total)
    await consumer.subscribe(SubscriptionSpec(destination=destination, group="g", prefetch=2000), sink.take)
    relay = Relay(stores.outbox, publisher, batch_size=500, poll_interval="1s")  # NOTIFY does the waking
    await relay.start()
    outbox = Outbox(stores.outbox, source="bench")
    committed: dict[str, float] = {}
    try:
        await asyncio.sleep(0.5)  # LISTEN connection up
        started = time.perf_counter()
        for i in range(total):
            due = started + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            async with AsyncSession(stores.engine) as session, session.begin():
                m = await outbox.publish(session, destination, {"n": i}, key=f"k{i % 50}")
            committed[m.id] = time.perf_counter()
        await asyncio.wait_for(sink.done.wait(), 60)
    finally:
        await relay.stop()
        await consumer.close()
        await publisher.close()
        await stores.drop()
        await stores.close()
    lat = sorted((sink.arrivals[k] - t) * 1000 for k, t in committed.items())
    return {
        "latency_p50_ms": statistics.median(lat),
        "latency_p99_ms": lat[int(len(lat) * 0.99) - 1],
        "latency_max_ms": lat[-1],
        "latency_messages": len(lat),
    }


async def consumer_cpu(broker: str, n: int, *, sql: bool) -> float:
    stores = SqlStores(f"{PG}?table_prefix={unique('bench_')}_")
    await stores.init()
    effects = Table(
        f"{stores.tables.prefix}effects",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("message_id", String(64)),
    )
    async with stores.engine.begin() as conn:
        await conn.run_sync(effects.metadata.create_all)
    destination = unique("bench.cpu.")
    feeder: Transport = transport_from_url(broker)
    await feeder.connect()
    mesh = Mesh(broker, service=unique("svc"))
    handled = asyncio.Event()
    count = 0

    def on_event(e: Event) -> None:
        nonlocal count
        if isinstance(e, MessageHandled):
            count += 1
            if count >= n:
                handled.set()

    mesh.add_listener(on_event)
    from meshlink_sqlalchemy import UnitOfWork

    if sql:

        @mesh.handler(
            destination,
            unit_of_work=UnitOfWork(stores),
            idempotency=None,
            retry=Retry(attempts=1),
            concurrency=64,
        )
        async def with_inbox(body: dict[str, Any], ctx: Context) -> None:
            await ctx.session.execute(effects.insert().values(message_id=ctx.message.id))
    else:
        memory = Idempotency(store=MemoryIdempotencyStore())

        @mesh.handler(destination, idempotency=memory, retry=Retry(attempts=1), concurrency=64)
        async def with_memory(body: dict[str, Any], ctx: Context) -> None:
            async with stores.engine.begin() as conn:  # the same effect, without the inbox row
                await conn.execute(effects.insert().values(message_id=ctx.message.id))

    try:
        await feeder.declare(destination, mesh.service)  # the group's queue keeps what is fed before start
        for i in range(0, n, 500):
            await feeder.publish_many(
                [
                    Outgoing(destination=destination, message=mesh.message({"n": j}, key=f"k{j % 64}"))
                    for j in range(i, min(n, i + 500))
                ]
            )
        cpu0 = time.process_time()
        async with mesh:
            await asyncio.wait_for(handled.wait(), 120)
            return (time.process_time() - cpu0) / n * 1e6
    finally:
        await feeder.close()
        async with stores.engine.begin() as conn:
            await conn.run_sync(effects.metadata.drop_all)
        await stores.drop()
        await stores.close()


def kafka_url(url: str) -> str:
    """``url`` with the test-broker settings it does not set itself."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    for name, value in KAFKA_TEST_OPTIONS.items():
        query.setdefault(name, value)
    return urlunsplit(parts._replace(path=parts.path or "/", query=urlencode(query)))


@contextlib.contextmanager
def kafka_broker(given: str | None, enabled: bool) -> Iterator[str | None]:
    """The Kafka URL to measure: given, from ``MESHLINK_KAFKA_BOOTSTRAP``, or a local broker."""
    if not enabled:
        yield None
        return
    if given:
        yield kafka_url(given)
        return
    bootstrap = os.environ.get("MESHLINK_KAFKA_BOOTSTRAP")
    if bootstrap:
        yield kafka_url(f"kafka://{bootstrap}")
        return
    path = Path(__file__).resolve().parents[1] / "scripts" / "kafka_broker.py"
    spec = importlib.util.spec_from_file_location("kafka_broker", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["kafka_broker"] = module
    spec.loader.exec_module(module)
    with module.LocalBroker.start() as broker:
        yield kafka_url(f"kafka://{broker.bootstrap}")


async def main(args: argparse.Namespace, kafka: str | None) -> None:
    results: dict[str, Any] = {}
    brokers = [("rabbitmq", args.broker), ("kafka", kafka)]
    for name, url in brokers:
        if url:
            results[name] = await throughput(url, args.messages, args.batch)
    for name, url in brokers:
        if url:
            results[f"latency_{name}_500_msg_s"] = await latency(url, 500, 5)
    sql = await consumer_cpu(args.broker, 5000, sql=True)
    mem = await consumer_cpu(args.broker, 5000, sql=False)
    results["consumer_cpu_us_per_msg"] = {"sql_inbox": sql, "memory_store": mem, "ratio": sql / mem}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    import logging

    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--broker", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--kafka", default=None, help="kafka://host:port (default: see the docstring)")
    parser.add_argument("--no-kafka", action="store_true", help="measure RabbitMQ only")
    arguments = parser.parse_args()
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    with kafka_broker(arguments.kafka, not arguments.no_kafka) as kafka_url_:
        asyncio.run(main(arguments, kafka_url_))
