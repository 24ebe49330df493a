"""The per-message context a handler receives as its second argument."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import structlog

from meshlink.clock import Clock
from meshlink.errors import MessageError
from meshlink.events import Event
from meshlink.message import REPLY_ECHO, REPLY_TO, Message
from meshlink.transport.base import Delivery

if TYPE_CHECKING:
    from meshlink.app import Mesh

__all__ = ["Context", "Publisher"]

Publisher = Callable[[str, Message, "float | None"], Awaitable[None]]
"""``async (destination, message, delay) -> None``: where a context's publishes go."""

_handler_log = structlog.get_logger("meshlink.handler")


class Context:
    """What a handler knows about the message it handles, and how it replies.

    Attributes:
        message: the envelope as received.
        delivery: the transport's delivery (settled by the mesh, not by handlers).
        handler: the handler's name.
        payload: the decoded body (set by the decode stage).
    """

    __slots__ = (
        "_items",
        "_mesh",
        "_task",
        "attempt",
        "delivery",
        "first_failed_at",
        "handler",
        "message",
        "payload",
        "publisher",
        "session",
    )

    def __init__(self, mesh: Mesh, delivery: Delivery, handler: str) -> None:
        self._mesh = mesh
        self.delivery = delivery
        self.message: Message = delivery.message
        self.handler = handler
        self.payload: Any = None
        self.attempt: int = delivery.message.attempt
        """The execution now running (1-based across retries and redeliveries)."""
        self.first_failed_at: float | None = None
        """Wall time of the first failure, once there was one."""
        self._items: dict[str, Any] | None = None
        self.session: Any = None
        """A unit of work opened by middleware (e.g. the SQL inbox's transaction), if any."""
        self.publisher: Publisher | None = None
        """Where :meth:`publish` sends messages; middleware may route them (e.g. to an
        outbox in ``session``). ``None`` publishes through the mesh's transport."""
        self._task: asyncio.Task[Any] | None = None
        """The task running this delivery (set by the dispatcher)."""

    @property
    def log(self) -> Any:
        """A structlog logger; the message's ids are bound through context variables."""
        return _handler_log

    @property
    def items(self) -> dict[str, Any]:
        """Free space for middleware to pass values down the chain (created on first use)."""
        if self._items is None:
            self._items = {}
        return self._items

    @property
    def destination(self) -> str:
        """Where the message was consumed from."""
        return self.delivery.destination

    @property
    def group(self) -> str:
        """The consumer group that received it."""
        return self.delivery.group

    @property
    def clock(self) -> Clock:
        """The mesh's clock (time-based policies use it, so tests can fake time)."""
        return self._mesh.clock

    def emit(self, event: Event) -> None:
        """Send an event to the mesh's listeners."""
        self._mesh.emit(event)

    async def publish(
        self,
        destination: str,
        payload: object,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        type: str | None = None,
        idempotency_key: str | None = None,
        delay: float | None = None,
    ) -> Message:
        """Publish a message caused by this one (correlation and causation ids are carried).

        Goes through :attr:`publisher` when middleware set one (an outbox writing in
        the handler's transaction), else straight to the broker.
        """
        message = self._mesh.message(
            payload,
            key=key,
            headers=headers,
            type=type,
            idempotency_key=idempotency_key,
            correlation_id=self.message.correlation_id or self.message.id,
            causation_id=self.message.id,
        )
        if self.publisher is not None:
            await self.publisher(destination, message, delay)
            return message
        return await self._mesh.publish(destination, message, delay=delay)

    async def reply(self, payload: object, *, type: str | None = None) -> Message:
        """Answer the message being handled: publish to its ``reply-to`` destination.

        Headers the requester listed in ``reply-echo`` (comma-separated; a saga
        coordinator lists its saga id and step) are copied onto the reply, so the
        requester can correlate it.

        Raises:
            MessageError: the message carries no ``reply-to`` header.
        """
        target = self.message.headers.get(REPLY_TO)
        if not target:
            raise MessageError("the message has no reply-to header", message_id=self.message.id)
        echo = [h.strip() for h in self.message.headers.get(REPLY_ECHO, "").split(",") if h.strip()]
        headers = {h: self.message.headers[h] for h in echo if h in self.message.headers}
        message = self._mesh.message(
            payload,
            key=self.message.key,
            headers=headers,
            type=type,
            correlation_id=self.message.correlation_id or self.message.id,
            causation_id=self.message.id,
        )
        if self.publisher is not None:
            await self.publisher(target, message, None)
            return message
        return await self._mesh.publish(target, message)
