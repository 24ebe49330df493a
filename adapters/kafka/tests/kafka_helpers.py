"""Shared pieces of the Kafka acceptance tests."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import random
import sys
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from meshlink.message import Message
from meshlink.transport.base import Delivery, Outgoing, Transport
from meshlink_kafka import KafkaTransport

ENV = "MESHLINK_KAFKA_BOOTSTRAP"
_SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "kafka_broker.py"

#: Settings for tests: short group timeouts (every consumer start pays a JoinGroup wait),
#: a short fetch wait, frequent commits. They satisfy the same validation as production ones.
TEST_OPTIONS: dict[str, Any] = {
    "session_timeout_ms": 6_000,
    "heartbeat_interval_ms": 500,
    "rebalance_timeout_ms": 6_000,
    "request_timeout_ms": 12_000,
    "max_poll_interval_ms": 60_000,
    "drain_timeout": 3.0,
    "fetch_max_wait_ms": 10,
    "commit_interval": 0.2,
    "linger_ms": 1,
    "connect_timeout": 15.0,
}


def broker_script() -> ModuleType:
    """``scripts/kafka_broker.py`` as a module (scripts/ is not a package)."""
    name = "meshlink_kafka_broker_script"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"Kafka broker unavailable under CI=true: {reason}", pytrace=False)
    pytest.skip(f"Kafka broker unavailable: {reason}")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def transport(bootstrap: str, **options: Any) -> KafkaTransport:
    return KafkaTransport(f"kafka://{bootstrap}", **{**TEST_OPTIONS, **options})


def keyed_messages(count: int, keys: int) -> list[Message]:
    """``count`` messages round-robin over ``keys`` keys; the body is ``key:seq``."""
    seq: dict[str, int] = defaultdict(int)
    out = []
    for i in range(count):
        key = f"key-{i % keys}"
        out.append(Message(body=f"{key}:{seq[key]}".encode(), type="Seq", key=key))
        seq[key] += 1
    return out


async def publish_all(t: Transport, destination: str, messages: list[Message], chunk: int = 2_000) -> None:
    for i in range(0, len(messages), chunk):
        await t.publish_many([Outgoing(destination=destination, message=m) for m in messages[i : i + chunk]])


@dataclass
class Handled:
    """One completed handling."""

    id: str
    key: str
    seq: int
    partition: int
    offset: int
    run: int


@dataclass
class Worker:
    """A subscriber that runs each delivery in its own task after a random delay, then acks."""

    run: int = 0
    max_delay: float = 0.002
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    handled: list[Handled] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    on_progress: Callable[[], None] = lambda: None

    async def __call__(self, delivery: Delivery) -> None:
        task = asyncio.get_running_loop().create_task(self._handle(delivery, self.run))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _handle(self, delivery: Delivery, run: int) -> None:
        await asyncio.sleep(self.rng.random() * self.max_delay)  # simulated work of varying length
        key, _, seq = delivery.message.body.decode().partition(":")
        loc = delivery.location
        self.handled.append(
            Handled(delivery.message.id, key, int(seq), int(loc["partition"]), int(loc["offset"]), run)
        )
        await delivery.ack()
        self.on_progress()

    async def crash_handlers(self) -> None:
        """Cancel every handler still running (their deliveries stay unsettled)."""
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def committed_offsets(bootstrap: str, group_id: str, topic: str, partitions: int) -> dict[int, int]:
    """The group's committed position per partition (-1 when none)."""
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False)
    await c.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        c.assign(tps)
        return {tp.partition: (await c.committed(tp)) or -1 for tp in tps}
    finally:
        await c.stop()


class Progress:
    """An event to await a condition on, poked by handlers."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def poke(self) -> None:
        self._event.set()

    async def until(self, predicate: Callable[[], bool], timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._event.clear()
                await self._event.wait()
