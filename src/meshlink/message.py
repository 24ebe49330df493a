"""The envelope: an immutable message and its wire headers.

Every transport carries a :class:`Message` as a body plus a flat ``str -> str``
header map. The header names follow CloudEvents 1.0 binary mode (``ce_id``,
``ce_type``, ``ce_source``, ``ce_time``, ``ce_specversion``) so that services
not written with meshlink can read and write them; meshlink adds its own
(``correlation-id``, ``causation-id``, ``idempotency-key``, ``attempt``) and,
on dead-lettered messages, the ``x-meshlink-*`` failure headers.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

__all__ = [
    "CE_ID",
    "CE_SOURCE",
    "CE_SPECVERSION",
    "CE_TIME",
    "CE_TYPE",
    "CONTENT_TYPE",
    "FAILURE_PREFIX",
    "H_ATTEMPT",
    "H_CAUSATION_ID",
    "H_CORRELATION_ID",
    "H_IDEMPOTENCY_KEY",
    "REPLY_ECHO",
    "REPLY_TO",
    "RESERVED_HEADERS",
    "Message",
    "new_message_id",
]

CE_SPECVERSION = "ce_specversion"
CE_ID = "ce_id"
CE_TYPE = "ce_type"
CE_SOURCE = "ce_source"
CE_TIME = "ce_time"
CONTENT_TYPE = "content-type"
H_CORRELATION_ID = "correlation-id"
H_CAUSATION_ID = "causation-id"
H_IDEMPOTENCY_KEY = "idempotency-key"
H_ATTEMPT = "attempt"
FAILURE_PREFIX = "x-meshlink-"
REPLY_TO = "reply-to"
"""Where a reply to this message should go (see ``Context.reply``)."""
REPLY_ECHO = "reply-echo"
"""Comma-separated header names a reply must carry back."""
#: Header names a user may not set through ``headers=``: they are envelope fields.
RESERVED_HEADERS = frozenset(
    {
        CE_SPECVERSION,
        CE_ID,
        CE_TYPE,
        CE_SOURCE,
        CE_TIME,
        CONTENT_TYPE,
        H_CORRELATION_ID,
        H_CAUSATION_ID,
        H_IDEMPOTENCY_KEY,
        H_ATTEMPT,
    }
)
_SPECVERSION = "1.0"


def new_message_id() -> str:
    """Return a new unique message id (a UUID4 in hex)."""
    return uuid.uuid4().hex


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """One message: envelope fields plus the encoded body.

    Immutable; derive a changed copy with :meth:`replace`.
    """

    body: bytes
    """The encoded payload (JSON by default; raw bytes pass through untouched)."""
    type: str = ""
    """Logical type name (``ce_type``), by default the payload model's class name."""
    id: str = field(default_factory=new_message_id)
    """Unique message id (``ce_id``). Kept across redeliveries and dead-lettering."""
    source: str = ""
    """The service that produced the message (``ce_source``)."""
    time: datetime = field(default_factory=_utcnow)
    """When the message was first produced (``ce_time``), timezone-aware."""
    key: str | None = None
    """Ordering and partitioning key (Kafka record key, AMQP routing key)."""
    content_type: str = "application/json"
    """MIME type of ``body``."""
    correlation_id: str | None = None
    """Id shared by every message of one conversation."""
    causation_id: str | None = None
    """Id of the message whose handling produced this one."""
    idempotency_key: str = ""
    """Key that identifies duplicates; defaults to ``id``."""
    attempt: int = 1
    """Delivery attempt, incremented by delayed redelivery; 1 on first delivery."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Extension headers (anything that is not an envelope field)."""

    def __post_init__(self) -> None:
        if not self.idempotency_key:
            object.__setattr__(self, "idempotency_key", self.id)
        if not isinstance(self.headers, MappingProxyType):
            object.__setattr__(self, "headers", MappingProxyType(dict(self.headers)))
        if self.time.tzinfo is None:
            object.__setattr__(self, "time", self.time.replace(tzinfo=UTC))

    def replace(self, **changes: Any) -> Message:
        """Return a copy with ``changes`` applied (the id is kept unless given)."""
        return dataclasses.replace(self, **changes)

    def with_headers(self, extra: Mapping[str, str]) -> Message:
        """Return a copy whose extension headers are updated with ``extra``."""
        merged = dict(self.headers)
        merged.update(extra)
        return dataclasses.replace(self, headers=merged)

    def to_headers(self) -> dict[str, str]:
        """Return the flat wire headers: CloudEvents attributes, meshlink fields, extensions."""
        out = dict(self.headers)
        out[CE_SPECVERSION] = _SPECVERSION
        out[CE_ID] = self.id
        out[CE_TYPE] = self.type
        out[CE_SOURCE] = self.source
        out[CE_TIME] = self.time.isoformat()
        out[CONTENT_TYPE] = self.content_type
        out[H_IDEMPOTENCY_KEY] = self.idempotency_key
        out[H_ATTEMPT] = str(self.attempt)
        if self.correlation_id is not None:
            out[H_CORRELATION_ID] = self.correlation_id
        if self.causation_id is not None:
            out[H_CAUSATION_ID] = self.causation_id
        return out

    @classmethod
    def from_headers(
        cls,
        headers: Mapping[str, str | bytes | Any],
        body: bytes,
        *,
        key: str | None = None,
    ) -> Message:
        """Rebuild a message from wire headers.

        Lenient by design: a message from a producer that is not meshlink may lack
        every envelope header. A missing id gets a fresh one, a missing or unreadable
        time becomes now, and an unreadable attempt becomes 1, so that the message
        still reaches its handler (or the dead-letter destination) instead of being
        lost in the transport.
        """
        # broker clients hand over str (AMQP) or bytes (Kafka); convert only what is not str
        text = {
            k: v
            if v.__class__ is str
            else v.decode("utf-8", "replace")
            if v.__class__ is bytes
            else _as_text(v)
            for k, v in headers.items()
        }
        attempt_raw = text.pop(H_ATTEMPT, "1")
        try:
            attempt = max(1, int(attempt_raw))
        except ValueError:
            attempt = 1
        time_raw = text.pop(CE_TIME, "")
        try:
            time = datetime.fromisoformat(time_raw) if time_raw else _utcnow()
        except ValueError:
            time = _utcnow()
        text.pop(CE_SPECVERSION, None)
        msg_id = text.pop(CE_ID, "") or new_message_id()
        # Trusted construction: every value is already of its field's type, so the
        # generated __init__ and __post_init__ (which copy and check) are skipped on
        # this per-message path.
        message = object.__new__(cls)
        for slot, value in zip(
            _SLOT_SETTERS,
            (
                body,
                text.pop(CE_TYPE, ""),
                msg_id,
                text.pop(CE_SOURCE, ""),
                time if time.tzinfo is not None else time.replace(tzinfo=UTC),
                key,
                text.pop(CONTENT_TYPE, "application/json"),
                text.pop(H_CORRELATION_ID, None),
                text.pop(H_CAUSATION_ID, None),
                text.pop(H_IDEMPOTENCY_KEY, "") or msg_id,
                attempt,
                MappingProxyType(text),
            ),
            strict=True,
        ):
            slot(message, value)
        return message


_SLOT_SETTERS = tuple(getattr(Message, f.name).__set__ for f in dataclasses.fields(Message))
"""Slot setters in field order, for the trusted constructor in :meth:`Message.from_headers`."""


def _as_text(value: object) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)
