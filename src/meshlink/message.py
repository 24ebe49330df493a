"""The envelope: an immutable message and its wire headers.

Every transport carries a :class:`Message` as a body plus a flat ``str -> str``
header map. The header names follow CloudEvents 1.0 binary mode (``ce_id``,
``ce_type``, ``ce_source``, ``ce_time``, ``ce_specversion``) so that services
not written with meshlink can read and write them; meshlink adds its own
(``correlation-id``, ``causation-id``, ``idempotency-key``, ``attempt``) and,
on dead-lettered messages, the ``x-meshlink-*`` failure headers.

A meshlink header that only repeats its default is left off the wire:
``idempotency-key`` when it equals ``ce_id``, ``attempt`` when it is 1 (a first
delivery), ``correlation-id`` and ``causation-id`` when there are none. A reader
treats a missing one as its default, so a message means the same with or without
them; every header a record carries costs its producer and each consumer on every
message (a third of a raw Kafka consumer's time for the full set).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from random import getrandbits
from types import MappingProxyType
from typing import Any, cast

from meshlink.headers import (
    CE_ID,
    CE_SOURCE,
    CE_SPECVERSION,
    CE_TIME,
    CE_TYPE,
    CONTENT_TYPE,
    FAILURE_PREFIX,
    H_ATTEMPT,
    H_CAUSATION_ID,
    H_CORRELATION_ID,
    H_IDEMPOTENCY_KEY,
    REPLY_ECHO,
    REPLY_TO,
    RESERVED_HEADERS,
)

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

_SPECVERSION = "1.0"
_SPECVERSION_BYTES = _SPECVERSION.encode()
_SPECVERSION_PAIR = (CE_SPECVERSION, _SPECVERSION_BYTES)


class _Pairs(dict[str, tuple[str, bytes]]):
    """Encoded ``(name, value)`` header pairs of one envelope field, by value.

    Types, sources and content types repeat from message to message: their pair is
    built once and shared (a tuple and an encode less per produced message, and one
    object less for the garbage collector to track). Bounded: past ``_MAX_PAIRS``
    distinct values it starts afresh.
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def pair(self, value: str) -> tuple[str, bytes]:
        if len(self) >= _MAX_PAIRS:
            self.clear()
        made = self[value] = (self.name, value.encode())
        return made


_MAX_PAIRS = 1_024
_TYPE_PAIRS = _Pairs(CE_TYPE)
_SOURCE_PAIRS = _Pairs(CE_SOURCE)
_CONTENT_TYPE_PAIRS = _Pairs(CONTENT_TYPE)


def new_message_id() -> str:
    """Return a new unique message id (a random UUID, version 4, in hex).

    Drawn from :func:`random.getrandbits` rather than :func:`uuid.uuid4`: ids must be
    unique, not secret, and ``uuid4`` costs a system call per message (a fifth of the
    envelope's cost). The generator is seeded from the OS and re-seeded in a forked
    child, so processes do not share a sequence.
    """
    return "%032x" % (getrandbits(128) & _UUID4_CLEAR | _UUID4_SET)


#: Version (4) and variant (RFC 4122) bits of a random UUID, as in :func:`uuid.uuid4`.
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


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

    def __getstate__(self) -> list[Any]:
        # The dataclass' own state would hold the headers' read-only proxy, which neither
        # pickle nor deepcopy can copy: a message could not cross a process boundary.
        state = [getattr(self, name) for name in _FIELD_NAMES]
        state[_HEADERS_AT] = dict(self.headers)
        return state

    def __setstate__(self, state: list[Any]) -> None:
        state = list(state)
        state[_HEADERS_AT] = MappingProxyType(dict(state[_HEADERS_AT]))
        for setter, value in zip(_SETTERS, state, strict=True):
            setter(self, value)

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
        # an extension named like an envelope header never reaches the wire: the field counts
        out = {k: v for k, v in self.headers.items() if k not in RESERVED_HEADERS}
        out[CE_SPECVERSION] = _SPECVERSION
        out[CE_ID] = self.id
        out[CE_TYPE] = self.type
        out[CE_SOURCE] = self.source
        out[CE_TIME] = self.time.isoformat()
        out[CONTENT_TYPE] = self.content_type
        if self.idempotency_key != self.id:
            out[H_IDEMPOTENCY_KEY] = self.idempotency_key
        if self.attempt != 1:
            out[H_ATTEMPT] = str(self.attempt)
        if self.correlation_id is not None:
            out[H_CORRELATION_ID] = self.correlation_id
        if self.causation_id is not None:
            out[H_CAUSATION_ID] = self.causation_id
        return out

    def header_pairs(self) -> list[tuple[str, bytes]]:
        """:meth:`to_headers` as UTF-8 encoded ``(name, value)`` pairs (Kafka record headers),
        built directly: this runs for every produced message."""
        pairs = [
            _SPECVERSION_PAIR,
            (CE_ID, self.id.encode()),
            _TYPE_PAIRS.get(self.type) or _TYPE_PAIRS.pair(self.type),
            _SOURCE_PAIRS.get(self.source) or _SOURCE_PAIRS.pair(self.source),
            (CE_TIME, self.time.isoformat().encode()),
            _CONTENT_TYPE_PAIRS.get(self.content_type) or _CONTENT_TYPE_PAIRS.pair(self.content_type),
        ]
        if self.headers:
            pairs[:0] = [(k, v.encode()) for k, v in self.headers.items() if k not in RESERVED_HEADERS]
        if self.idempotency_key != self.id:
            pairs.append((H_IDEMPOTENCY_KEY, self.idempotency_key.encode()))
        if self.attempt != 1:
            pairs.append((H_ATTEMPT, str(self.attempt).encode()))
        if self.correlation_id is not None:
            pairs.append((H_CORRELATION_ID, self.correlation_id.encode()))
        if self.causation_id is not None:
            pairs.append((H_CAUSATION_ID, self.causation_id.encode()))
        return pairs

    @classmethod
    def from_headers(
        cls,
        headers: Mapping[str, str | bytes | Any] | Iterable[tuple[str, str | bytes | Any]],
        body: bytes,
        *,
        key: str | None = None,
    ) -> Message:
        """Rebuild a message from wire headers: a mapping, or the (name, value) pairs a
        Kafka record carries (a repeated name: the last one counts, as in a dict).

        Lenient by design: a message from a producer that is not meshlink may lack
        every envelope header. A missing id gets a fresh one, a missing or unreadable
        time becomes now, and an unreadable attempt becomes 1, so that the message
        still reaches its handler (or the dead-letter destination) instead of being
        lost in the transport.
        """
        # One pass over the pairs, each value decoded once (broker clients hand over str
        # for AMQP, bytes for Kafka): this runs for every consumed message.
        items = getattr(headers, "items", None)
        # a mapping's items, or the pairs themselves (a Mapping is never passed as pairs)
        pairs = cast("Iterable[tuple[str, Any]]", items() if items is not None else headers)
        # envelope values by field number (see _ENVELOPE); anything else is an extension
        fields: list[str | None] = [None] * 10
        extensions: dict[str, str] | None = None
        envelope = _ENVELOPE.get
        for name, value in pairs:
            if value is None:  # a null header (Kafka allows them): as if it were not there
                continue
            if value.__class__ is not str:
                value = value.decode("utf-8", "replace") if value.__class__ is bytes else _as_text(value)
            number = envelope(name)
            if number is not None:
                fields[number] = value
            elif extensions is None:
                extensions = {name: value}
            else:
                extensions[name] = value
        msg_id, type_, source, time_raw, content_type, idem, attempt_raw, correlation, causation, _ = fields
        try:
            attempt = max(1, int(attempt_raw)) if attempt_raw is not None else 1
        except ValueError:
            attempt = 1
        try:
            time = datetime.fromisoformat(time_raw) if time_raw else _utcnow()
        except ValueError:
            time = _utcnow()
        if time.tzinfo is None:
            time = time.replace(tzinfo=UTC)
        if not msg_id:
            msg_id = new_message_id()
        return cls._trusted(
            body,
            type_ or "",
            msg_id,
            source or "",
            time,
            key,
            content_type if content_type is not None else "application/json",
            correlation,
            causation,
            idem or msg_id,
            attempt,
            _NO_HEADERS if extensions is None else MappingProxyType(extensions),
        )

    @classmethod
    def _trusted(
        cls,
        body: bytes,
        type: str,
        id: str,
        source: str,
        time: datetime,
        key: str | None,
        content_type: str,
        correlation_id: str | None,
        causation_id: str | None,
        idempotency_key: str,
        attempt: int,
        headers: Mapping[str, str],
    ) -> Message:
        """Build without the generated ``__init__``/``__post_init__`` (which copy and check):
        for meshlink's per-message paths, whose values are already final (``time`` aware,
        ``headers`` a read-only proxy, ``idempotency_key`` set)."""
        if cls is not Message:  # a subclass may have another layout: the slot setters
            message = object.__new__(cls)
            for setter, value in zip(
                _SETTERS,
                (
                    body,
                    type,
                    id,
                    source,
                    time,
                    key,
                    content_type,
                    correlation_id,
                    causation_id,
                    idempotency_key,
                    attempt,
                    headers,
                ),
                strict=True,
            ):
                setter(message, value)
            return message
        # Filled as an _Unfrozen (plain slot stores), then made a Message: the two classes
        # have one slot layout, so __class__ may be assigned. A third of the cost of twelve
        # calls of the frozen class's slot descriptors, for every message in and out.
        draft = _Unfrozen()
        draft.body = body
        draft.type = type
        draft.id = id
        draft.source = source
        draft.time = time
        draft.key = key
        draft.content_type = content_type
        draft.correlation_id = correlation_id
        draft.causation_id = causation_id
        draft.idempotency_key = idempotency_key
        draft.attempt = attempt
        draft.headers = headers
        draft.__class__ = Message  # type: ignore[assignment]
        return cast("Message", draft)


class _Unfrozen:
    """:class:`Message`'s slots without its frozen ``__setattr__`` (see ``Message._trusted``)."""

    __slots__ = Message.__slots__
    body: bytes
    type: str
    id: str
    source: str
    time: datetime
    key: str | None
    content_type: str
    correlation_id: str | None
    causation_id: str | None
    idempotency_key: str
    attempt: int
    headers: Mapping[str, str]


# Slot setters, in field order, for the trusted constructor of a subclass.
_SETTERS = tuple(getattr(Message, f.name).__set__ for f in dataclasses.fields(Message))
_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(Message))
_HEADERS_AT = _FIELD_NAMES.index("headers")
_NO_HEADERS: Mapping[str, str] = MappingProxyType({})
#: Envelope header name -> the field it fills (in :meth:`Message.from_headers`); a spec version
#: is recognised (so it is not kept as an extension) and otherwise ignored.
_ENVELOPE = {
    CE_ID: 0,
    CE_TYPE: 1,
    CE_SOURCE: 2,
    CE_TIME: 3,
    CONTENT_TYPE: 4,
    H_IDEMPOTENCY_KEY: 5,
    H_ATTEMPT: 6,
    H_CORRELATION_ID: 7,
    H_CAUSATION_ID: 8,
    CE_SPECVERSION: 9,
}


def _as_text(value: object) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)
