"""Run a :class:`~meshlink.Mesh` inside a test and look at what it did.

::

    async with MeshHarness(mesh) as h:
        await h.publish("orders.placed", OrderPlaced(order_id="o1"))
        await h.idle()
        assert h.payloads("charge") == [OrderPlaced(order_id="o1")]
        assert h.dead_lettered == []

:meth:`MeshHarness.idle` waits for a condition, never a fixed time: on a
transport that knows when it is idle (``memory://``) it returns once nothing is
ready or being handled; on a broker, use :meth:`MeshHarness.wait_for`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType
from typing import Any

from meshlink.app import Mesh
from meshlink.errors import ConfigurationError
from meshlink.events import Event, HandlerFailed, MessageDeadLettered, MessageHandled, MessagePublished
from meshlink.message import Message
from meshlink.transport.base import Idleable

__all__ = ["MeshHarness"]


class MeshHarness:
    """Starts a mesh, records its events, and waits on conditions.

    Attributes:
        handled: every :class:`~meshlink.events.MessageHandled`, in order.
        failed: every :class:`~meshlink.events.HandlerFailed`.
        published: every :class:`~meshlink.events.MessagePublished` (by the mesh and its handlers).
        dead_lettered: every :class:`~meshlink.events.MessageDeadLettered`.
    """

    def __init__(self, mesh: Mesh, *, timeout: float = 10.0) -> None:
        self.mesh = mesh
        self.timeout = timeout
        self.handled: list[MessageHandled] = []
        self.failed: list[HandlerFailed] = []
        self.published: list[MessagePublished] = []
        self.dead_lettered: list[MessageDeadLettered] = []
        self.events: list[Event] = []
        self._changed = asyncio.Condition()
        mesh.add_listener(self._record)

    def _record(self, event: Event) -> None:
        self.events.append(event)
        if isinstance(event, MessageHandled):
            self.handled.append(event)
        elif isinstance(event, HandlerFailed):
            self.failed.append(event)
        elif isinstance(event, MessagePublished):
            self.published.append(event)
        elif isinstance(event, MessageDeadLettered):
            self.dead_lettered.append(event)
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def __aenter__(self) -> MeshHarness:
        await self.mesh.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.mesh.stop()
        self.mesh.remove_listener(self._record)

    async def publish(self, destination: str, payload: object, **kwargs: Any) -> Message:
        """Publish through the mesh (same keywords as :meth:`Mesh.publish`)."""
        return await self.mesh.publish(destination, payload, **kwargs)

    async def idle(self) -> None:
        """Wait until the transport has nothing ready or unsettled and no handler runs."""
        transport = self.mesh.transport
        if not isinstance(transport, Idleable):
            raise ConfigurationError(
                "transport", f"{transport.describe()} cannot tell when it is idle; use wait_for()"
            )
        async with asyncio.timeout(self.timeout):
            while True:
                await transport.wait_idle()
                if self.mesh.in_flight == 0:
                    await asyncio.sleep(0)  # let done-callbacks and listeners run
                    if self.mesh.in_flight == 0:
                        return
                else:
                    await asyncio.wait({t for d in self.mesh.dispatchers for t in d.tasks})

    async def wait_for(self, predicate: Callable[[MeshHarness], bool], timeout: float | None = None) -> None:
        """Wait until ``predicate(self)`` is true (re-checked after every event)."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: predicate(self)), timeout or self.timeout)

    def payloads(self, handler: str | None = None) -> list[object]:
        """Decoded payloads handled so far, optionally of one handler."""
        return [e.payload for e in self.handled if handler is None or e.handler == handler]

    def published_to(self, destination: str) -> list[Message]:
        """Messages published to ``destination`` so far."""
        return [e.message for e in self.published if e.destination == destination]
