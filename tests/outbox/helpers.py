"""Helpers for the outbox tests: a scriptable transport and an event recorder."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from meshlink.errors import PublishBatchError
from meshlink.events import Event
from meshlink.message import Message
from meshlink.transport.base import DeliveryCallback, Outgoing, Subscription, SubscriptionSpec, Transport


class ScriptedTransport(Transport):
    """Records what is published; ``fail`` decides per message which error (if any) it raises."""

    schemes = ("scripted",)

    def __init__(self) -> None:
        self.calls: list[list[Outgoing]] = []
        self.published: list[Message] = []
        self.fail: Callable[[Outgoing], BaseException | None] = lambda o: None

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def declare(self, destination: str, group: str | None = None) -> None: ...

    async def publish(self, destination: str, message: Message, *, delay: float | None = None) -> None:
        await self.publish_many([Outgoing(destination=destination, message=message, delay=delay)])

    async def publish_many(self, items: Sequence[Outgoing]) -> None:
        self.calls.append(list(items))
        failures = [(i, e) for i, o in enumerate(items) if (e := self.fail(o)) is not None]
        failed = {i for i, _ in failures}
        self.published.extend(o.message for i, o in enumerate(items) if i not in failed)
        await asyncio.sleep(0)
        if failures:
            raise PublishBatchError(failures, len(items))

    async def subscribe(self, spec: SubscriptionSpec, on_delivery: DeliveryCallback) -> Subscription:
        raise NotImplementedError


class Recorder:
    """A listener that keeps events and lets a test await a condition on them."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._changed = asyncio.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        self._changed.set()

    def of(self, kind: type[Event]) -> list[Event]:
        return [e for e in self.events if isinstance(e, kind)]

    async def until(self, condition: Callable[[], bool], timeout: float = 30.0) -> None:
        async def wait() -> None:
            while not condition():
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), timeout)  # a guard against hanging, not a timing assertion
