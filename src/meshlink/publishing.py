"""Publishing: the envelope a mesh sends, one publish, and many publishes pipelined.

:class:`Publisher` is the publishing half of :class:`~meshlink.Mesh` (which
inherits it); it needs only the mesh's service name, its transport, whether it
started, and its event listeners.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from meshlink.codec import check_size, envelope
from meshlink.errors import PublishBatchError, TransportClosedError
from meshlink.events import Event, Listener, MessagePublished
from meshlink.message import Message
from meshlink.resilience.defaults import Policies
from meshlink.transport.base import Outgoing, Transport

__all__ = ["Publisher"]


class Publisher:
    """``message``, ``publish`` and ``publish_many`` of a :class:`~meshlink.Mesh`."""

    service: str
    transport: Transport
    defaults: Policies
    _started: bool
    _listeners: list[Listener]

    def emit(self, event: Event) -> None:
        raise NotImplementedError  # the Mesh's

    def message(
        self,
        payload: object,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        type: str | None = None,
        idempotency_key: str | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
    ) -> Message:
        """Build the envelope :meth:`publish` would send (useful for outboxes and tests).

        Raises:
            EncodeError: ``payload`` cannot be encoded, or its body is larger than the
                mesh's ``defaults.max_body_bytes`` (one limit on every transport).
        """
        message = envelope(
            payload,
            source=self.service,
            key=key,
            headers=headers,
            type=type,
            idempotency_key=idempotency_key,
            correlation_id=correlation_id,
            causation_id=causation_id,
        )
        check_size(message, self.defaults.max_body_bytes)
        return message

    async def publish(
        self,
        destination: str,
        payload: object,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        type: str | None = None,
        idempotency_key: str | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        delay: float | None = None,
    ) -> Message:
        """Encode ``payload`` and publish it; returns once the broker confirmed it.

        ``payload`` may be a pydantic model, anything pydantic can serialise, raw
        ``bytes``, or a ready :class:`~meshlink.Message` (sent as is).

        Raises:
            TransportClosedError: the mesh is not started.
            EncodeError: ``payload`` cannot be encoded or is over ``max_body_bytes``.
            PublishError: the broker did not confirm (see its subclasses).
        """
        if not self._started:
            raise TransportClosedError("the mesh is not started; call `await mesh.start()` first")
        message = self.message(
            payload,
            key=key,
            headers=headers,
            type=type,
            idempotency_key=idempotency_key,
            correlation_id=correlation_id,
            causation_id=causation_id,
        )
        await self.transport.publish(destination, message, delay=delay)
        if self._listeners:
            self.emit(MessagePublished(destination=destination, message=message, delay=delay))
        return message

    async def publish_many(
        self,
        destination: str,
        payloads: Iterable[object],
        *,
        key: str | Callable[[Any], str | None] | None = None,
        headers: Mapping[str, str] | None = None,
        type: str | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        delay: float | None = None,
    ) -> list[Message]:
        """Publish every payload to ``destination``, pipelined; returns once all are confirmed.

        Every message is handed to the broker before any confirmation is awaited
        (on Kafka they share record batches), which is several times faster than
        awaiting one :meth:`publish` after another, and cheaper than gathering
        them. ``key`` is one key for all, or a function of each payload (for
        example ``key=lambda order: order.customer``). Each message gets its own id;
        a ready :class:`~meshlink.Message` is sent as is. On Kafka one key's
        messages reach its partition in the order given.

        Returns:
            The messages sent, in the order of ``payloads``.

        Raises:
            TransportClosedError: the mesh is not started.
            EncodeError: a payload cannot be encoded or is over ``max_body_bytes``
                (nothing was sent).
            PublishBatchError: naming, by index, each message that was not
                confirmed; every other one was (its ``messages`` are the ones sent).
        """
        if not self._started:
            raise TransportClosedError("the mesh is not started; call `await mesh.start()` first")
        items = list(payloads)
        keys = [key(p) for p in items] if callable(key) else [key] * len(items)
        messages = [
            self.message(
                payload,
                key=k,
                headers=headers,
                type=type,
                correlation_id=correlation_id,
                causation_id=causation_id,
            )
            for payload, k in zip(items, keys, strict=True)
        ]
        try:
            await self.transport.publish_many(
                [Outgoing(destination=destination, message=m, delay=delay) for m in messages]
            )
        except PublishBatchError as exc:
            exc.messages = messages
            failed = {i for i, _ in exc.failures}
            self._published(destination, [m for i, m in enumerate(messages) if i not in failed], delay)
            raise
        self._published(destination, messages, delay)
        return messages

    def _published(self, destination: str, messages: list[Message], delay: float | None) -> None:
        if self._listeners:
            for m in messages:
                self.emit(MessagePublished(destination=destination, message=m, delay=delay))
