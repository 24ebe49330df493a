"""A group member run as a child process by ``test_kafka_crash.py`` (then killed with SIGKILL).

Usage: ``python kafka_crash_member.py BOOTSTRAP TOPIC GROUP PARTITIONS PREFETCH COMMIT_INTERVAL``

Consumes ``TOPIC`` as a member of ``GROUP`` through :class:`KafkaTransport`, each delivery in a
task of its own after a short random delay (commits are the adapter's own: batched, every
``COMMIT_INTERVAL`` seconds). Prints ``READY`` once the first assignment arrived, then one
flushed line per handled message, *before* acking it:

    HANDLED <message id> <key> <seq> <partition> <offset>

Adapter logs go to stderr, so that stdout carries only these lines.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sys

import structlog
from kafka_helpers import transport

from meshlink.transport.base import Delivery, SubscriptionSpec


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def main(
    bootstrap: str, topic: str, group: str, partitions: int, prefetch: int, interval: float
) -> None:
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    rng = random.Random(11)
    tasks: set[asyncio.Task[None]] = set()

    async def handle(delivery: Delivery) -> None:
        await asyncio.sleep(rng.random() * 0.003)  # simulated work of varying length
        key, _, seq = delivery.message.body.decode().partition(":")
        loc = delivery.location
        _say(f"HANDLED {delivery.message.id} {key} {seq} {loc['partition']} {loc['offset']}")
        await delivery.ack()

    async def on_delivery(delivery: Delivery) -> None:
        task = asyncio.get_running_loop().create_task(handle(delivery))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    t = transport(bootstrap, partitions=partitions, commit_interval=interval)
    await t.connect()
    await t.subscribe(SubscriptionSpec(destination=topic, group=group, prefetch=prefetch), on_delivery)
    _say("READY")
    await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    boot, topic_, group_, parts, pre, every = sys.argv[1:7]
    asyncio.run(main(boot, topic_, group_, int(parts), int(pre), float(every)))
