"""Shared helpers: service checks, unique names, a collecting consumer, writers."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from urllib.parse import urlsplit

import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from meshlink.message import Message
from meshlink.outbox import Outbox
from meshlink.transport.base import Delivery, Subscription, SubscriptionSpec, Transport
from meshlink_sqlalchemy import SqlStores

PG_URL = os.environ.get("MESHLINK_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
RABBIT_URL = os.environ.get("MESHLINK_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")


def reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port), timeout=2):
            return True
    except OSError:
        return False


def require(url: str, default_port: int, what: str) -> None:
    """Skip when ``what`` is unreachable; fail instead under ``CI=true`` (CI never passes by skipping)."""
    if reachable(url, default_port):
        return
    message = f"{what} is not reachable at {urlsplit(url).hostname}:{urlsplit(url).port or default_port}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def unique(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def with_prefix(url: str, prefix: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}table_prefix={prefix}"


async def write_many(
    stores: SqlStores,
    destination: str,
    *,
    total: int,
    keys: int,
    per_transaction: int = 10,
    writers: int = 16,
) -> None:
    """Write ``total`` messages from ``writers`` concurrent tasks, ``per_transaction`` per commit.

    Each body is ``{"key": k, "seq": n}``; a key's ``seq`` grows in commit order (one
    writer owns each key, so a key's rows are written one transaction after another).
    """
    outbox = Outbox(stores.outbox, source="test")

    async def writer(w: int) -> None:
        mine = [k for k in range(keys) if k % writers == w]
        seq: dict[int, int] = defaultdict(int)
        count = sum(1 for i in range(total) if (i % keys) in mine)
        produced = 0
        while produced < count:
            async with AsyncSession(stores.engine) as session, session.begin():
                for _ in range(min(per_transaction, count - produced)):
                    k = mine[produced % len(mine)]
                    await outbox.publish(session, destination, {"key": k, "seq": seq[k]}, key=f"k{k}")
                    seq[k] += 1
                    produced += 1

    await asyncio.gather(*(writer(w) for w in range(min(writers, keys))))


class Collector:
    """Consumes one destination in one group and keeps every message in arrival order."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._changed = asyncio.Event()
        self.subscription: Subscription | None = None

    async def start(self, transport: Transport, destination: str, group: str) -> None:
        self.subscription = await transport.subscribe(
            SubscriptionSpec(destination=destination, group=group, prefetch=1000), self._take
        )

    async def _take(self, delivery: Delivery) -> None:
        self.messages.append(delivery.message)
        await delivery.ack()
        self._changed.set()

    async def until_distinct(self, n: int, timeout: float = 90.0) -> None:
        """Wait until ``n`` distinct message ids arrived (a guard against hangs, not a timing check)."""

        async def wait() -> None:
            while len({m.id for m in self.messages}) < n:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), timeout)

    def counts(self) -> Counter[str]:
        return Counter(m.id for m in self.messages)

    def assert_key_order(self) -> None:
        """Per key, first deliveries come in ``seq`` order (a duplicate may repeat an earlier one)."""
        last: dict[int, int] = {}
        seen: set[str] = set()
        for m in self.messages:
            if m.id in seen:
                continue
            seen.add(m.id)
            body = json.loads(m.body)
            k, seq = body["key"], body["seq"]
            assert seq == last.get(k, -1) + 1, f"key {k}: seq {seq} after {last.get(k)}"
            last[k] = seq


def bodies(messages: Sequence[Message]) -> list[dict[str, int]]:
    return [json.loads(m.body) for m in messages]


async def delete_topology(url: str, transport: Transport) -> None:
    """Delete the queues and exchanges a RabbitMQ transport declared (test clean-up)."""
    import aio_pika

    explain = getattr(transport, "explain", None)
    records = explain() if explain is not None else []
    conn = await aio_pika.connect(url)
    try:
        for rec in records:
            name = rec.get("name", "")
            if not name or name.startswith("meshlink.delay"):
                continue
            channel = await conn.channel()
            if rec.get("kind") == "queue":
                await channel.queue_delete(name)
            elif rec.get("kind") == "exchange":
                await channel.exchange_delete(name)
            await channel.close()
    finally:
        await conn.close()
