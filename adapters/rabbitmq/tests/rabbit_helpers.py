"""What the RabbitMQ adapter's tests share: unique names, a delivery recorder, a condition
wait, and an operator's second connection that looks at (and changes) the broker."""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import Callable
from typing import Any

import aio_pika

from meshlink.transport.base import Delivery

GUARD = 30.0
"""Hang guard (seconds) of every wait below: never a pass/fail threshold."""


def name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Collect:
    """Records deliveries; acks them unless ``ack=False`` (or while fewer than ``hold`` were
    received: those stay unsettled); lets a test await a count or a body."""

    def __init__(self, *, ack: bool = True, hold: int = 0) -> None:
        self.ack = ack
        self.hold = hold
        self.got: list[Delivery] = []
        self._changed = asyncio.Event()

    async def __call__(self, d: Delivery) -> None:
        self.got.append(d)
        self._changed.set()
        if self.ack and len(self.got) > self.hold:
            await d.ack()

    @property
    def bodies(self) -> list[bytes]:
        return [d.message.body for d in self.got]

    async def wait(self, n: int) -> None:
        async with asyncio.timeout(GUARD):
            while len(self.got) < n:
                self._changed.clear()
                await self._changed.wait()

    async def wait_for(self, body: bytes) -> None:
        async with asyncio.timeout(GUARD):
            while body not in self.bodies:
                self._changed.clear()
                await self._changed.wait()


async def until(predicate: Callable[[], Any], timeout: float = GUARD) -> None:
    """Await a condition flipped inside aio-pika or on the broker (no awaitable exists for it).

    ``predicate`` may return a bool or an awaitable of one; the timeout is a hang guard only.
    """
    async with asyncio.timeout(timeout):
        while True:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await asyncio.sleep(0.01)


class Operator:
    """A direct second connection that looks at the broker (and does what an operator would)."""

    def __init__(self, connection: aio_pika.abc.AbstractConnection) -> None:
        self.connection = connection

    async def queue_state(self, queue: str) -> tuple[int, int] | None:
        """(messages ready, consumers) of a queue, or ``None`` when it does not exist."""
        ch = await self.connection.channel()
        try:
            q = await ch.declare_queue(queue, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return None
        finally:
            if not ch.is_closed:
                await ch.close()
        r = q.declaration_result
        return r.message_count or 0, r.consumer_count or 0

    async def delete_queue(self, queue: str) -> None:
        async with self.connection.channel() as ch:
            await ch.queue_delete(queue)

    async def delete_exchange(self, exchange: str) -> None:
        async with self.connection.channel() as ch:
            await ch.exchange_delete(exchange)
