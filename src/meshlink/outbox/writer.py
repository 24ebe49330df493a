"""The outbox writer: publish inside the caller's own database transaction.

::

    outbox = Outbox(store, source="billing")
    async with AsyncSession(engine) as session, session.begin():
        session.add(Invoice(...))
        await outbox.publish(session, "invoices.created", InvoiceCreated(...), key=invoice_id)
    # committed: the relay publishes it; rolled back: nothing is ever sent

Inside a handler whose unit of work is a SQL transaction, ``ctx.publish`` goes
through :meth:`Outbox.publisher` into the same transaction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meshlink.clock import Clock, SystemClock
from meshlink.codec import check_size, envelope
from meshlink.context import Publisher
from meshlink.errors import ConfigurationError
from meshlink.message import Message
from meshlink.outbox.store import OutboxEntry, OutboxStore
from meshlink.resilience.defaults import DEFAULTS
from meshlink.resilience.policy import parse_duration

__all__ = ["Outbox"]


class Outbox:
    """Writes messages into an outbox store, in the caller's transaction.

    Args:
        store: the outbox store (``meshlink_sqlalchemy`` for SQL, or the memory store).
        source: the ``ce_source`` of messages built here (the service name).
        clock: time source for ``created_at`` and ``delay``.
        max_body_bytes: larger bodies are refused (``EncodeError``), as ``Mesh.publish``
            refuses them: never written, so never failing later at the relay.
    """

    def __init__(
        self,
        store: OutboxStore,
        *,
        source: str = "meshlink",
        clock: Clock | None = None,
        max_body_bytes: int = DEFAULTS.max_body_bytes,
    ) -> None:
        if max_body_bytes < 1:
            raise ConfigurationError("max_body_bytes", f"must be >= 1, got {max_body_bytes}")
        self.store = store
        self.source = source
        self.clock: Clock = clock or SystemClock()
        self.max_body_bytes = max_body_bytes

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
        """Build the envelope for ``payload`` (a ready :class:`~meshlink.Message` is kept, with ``key``)."""
        return envelope(
            payload,
            source=self.source,
            key=key,
            headers=headers,
            type=type,
            idempotency_key=idempotency_key,
            correlation_id=correlation_id,
            causation_id=causation_id,
        )

    async def publish(
        self,
        session: Any,
        destination: str,
        payload: object,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        type: str | None = None,
        idempotency_key: str | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        delay: float | str | None = None,
    ) -> Message:
        """Add a message to the outbox inside ``session``'s transaction; returns the envelope.

        Nothing reaches the broker unless that transaction commits. ``delay``
        (seconds or ``"5s"``) makes the message deliverable that long after it
        was written; the broker holds it, so it never blocks the relay.

        Raises:
            ConfigurationError: no destination, or a negative delay.
            EncodeError: the payload cannot be encoded, or ``headers`` names an envelope field.
        """
        message = self.message(
            payload,
            key=key,
            headers=headers,
            type=type,
            idempotency_key=idempotency_key,
            correlation_id=correlation_id,
            causation_id=causation_id,
        )
        await self.add(session, destination, message, delay=delay)
        return message

    async def add(
        self, session: Any, destination: str, message: Message, *, delay: float | str | None = None
    ) -> None:
        """Add a ready envelope to the outbox inside ``session``'s transaction."""
        if not destination:
            raise ConfigurationError("destination", "must be a non-empty string")
        check_size(message, self.max_body_bytes)
        now = self.clock.time()
        seconds = parse_duration(delay, setting="delay") if delay is not None else None
        entry = OutboxEntry(
            destination=destination,
            message=message,
            created_at=now,
            deliver_at=now + seconds if seconds else None,
        )
        await self.store.add(session, [entry])

    def publisher(self, session: Any) -> Publisher:
        """A :data:`~meshlink.context.Publisher` that writes into ``session`` (for ``ctx.publisher``)."""

        async def publish(destination: str, message: Message, delay: float | None) -> None:
            await self.add(session, destination, message, delay=delay)

        return publish
