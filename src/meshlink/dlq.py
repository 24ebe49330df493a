"""Dead-letter operations on any transport: list, show, replay.

Written against the transport contract alone, so it works on every broker:
*browsing* subscribes to the dead-letter group, takes what is there and gives it
all back (``nack(requeue=True)``); *replaying* publishes each chosen message —
same id, failure headers removed, ``attempt`` reset to 1 so its budget starts
afresh — to the retry destination of the group it failed in (only that group
gets it again), waits for the broker's confirmation, then acks the dead-lettered
copy. Messages not chosen are given back untouched.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from meshlink.app import DEAD_LETTER_GROUP
from meshlink.clock import Clock, SystemClock
from meshlink.errors import ConfigurationError
from meshlink.message import FAILURE_PREFIX, Message
from meshlink.resilience.deadletter import ORIGINAL_DESTINATION, ORIGINAL_GROUP
from meshlink.transport.base import Delivery, SubscriptionSpec, Transport

__all__ = ["DeadLetterQueue", "replay_target"]


def replay_target(message: Message) -> str | None:
    """The retry destination of the group ``message`` failed in (from its failure headers)."""
    dest = message.headers.get(ORIGINAL_DESTINATION)
    group = message.headers.get(ORIGINAL_GROUP)
    return f"{dest}.{group}.retry" if dest and group else None


def revived(message: Message) -> Message:
    """``message`` without failure headers and with a fresh attempt budget (same id)."""
    clean = {k: v for k, v in message.headers.items() if not k.startswith(FAILURE_PREFIX)}
    return message.replace(headers=clean, attempt=1)


@dataclass
class _Scan:
    taken: list[Delivery]
    done: asyncio.Event


class DeadLetterQueue:
    """One dead-letter destination.

    Args:
        transport: a connected transport.
        destination: the dead-letter destination (e.g. ``orders.placed.billing.dlq``).
        quiet: seconds without a new message after which a scan is complete (brokers
            cannot say "empty" through a subscription).
        clock: time source for rate limiting.
    """

    def __init__(
        self,
        transport: Transport,
        destination: str,
        *,
        quiet: float = 1.0,
        clock: Clock | None = None,
    ) -> None:
        self.transport = transport
        self.destination = destination
        self.quiet = quiet
        self.clock = clock or SystemClock()

    async def _scan(self, limit: int) -> list[Delivery]:
        if limit < 1:
            raise ConfigurationError("limit", f"must be >= 1, got {limit}")
        scan = _Scan([], asyncio.Event())

        async def take(delivery: Delivery) -> None:
            scan.taken.append(delivery)
            if len(scan.taken) >= limit:
                scan.done.set()

        sub = await self.transport.subscribe(
            SubscriptionSpec(destination=self.destination, group=DEAD_LETTER_GROUP, prefetch=limit), take
        )
        try:
            while not scan.done.is_set():
                seen = len(scan.taken)
                try:
                    await asyncio.wait_for(scan.done.wait(), self.quiet)
                except TimeoutError:
                    if len(scan.taken) == seen:
                        break
        finally:
            await sub.stop()
        return scan.taken

    async def list(self, limit: int = 100) -> list[Message]:
        """Up to ``limit`` dead-lettered messages, left where they are."""
        taken = await self._scan(limit)
        for d in taken:
            await d.nack(requeue=True)
        return [d.message for d in taken]

    async def show(self, message_id: str, limit: int = 10_000) -> Message | None:
        """The dead-lettered message with ``message_id``, if present."""
        return next((m for m in await self.list(limit) if m.id == message_id), None)

    async def replay(
        self,
        choose: Callable[[Message], bool] = lambda m: True,
        *,
        limit: int = 10_000,
        rate: float | None = None,
        progress: Callable[[Message], None] | None = None,
    ) -> int:
        """Replay the chosen messages to their groups; returns how many were replayed.

        Args:
            choose: which messages to replay (all by default).
            limit: most messages to look at.
            rate: most messages per second (``None``: as fast as the broker confirms).
            progress: called after each replayed message.
        """
        if rate is not None and not rate > 0:
            raise ConfigurationError("rate", f"must be > 0 messages per second, got {rate}")
        taken = await self._scan(limit)
        replayed = 0
        try:
            for d in taken:
                target = replay_target(d.message)
                if target is None or not choose(d.message):
                    continue
                await self.transport.publish(target, revived(d.message))
                await d.ack()
                replayed += 1
                if progress is not None:
                    progress(d.message)
                if rate:
                    await self.clock.sleep(1.0 / rate)
        finally:
            for d in taken:
                if d.settled is None:
                    await d.nack(requeue=True)
        return replayed
