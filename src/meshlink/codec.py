"""Encoding payloads to bodies and decoding bodies into handler types, through pydantic.

* a pydantic model → its JSON; decoded with ``model_validate_json``;
* ``bytes`` → passed through untouched (``application/octet-stream``);
* anything pydantic can serialise (dicts, lists, dataclasses…) → JSON, decoded
  through a cached :class:`pydantic.TypeAdapter` for the target type.

A body that does not fit the target raises :class:`~meshlink.errors.DecodeError`,
which is never retried.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from functools import lru_cache
from types import MappingProxyType
from typing import Any, TypeVar

import pydantic
import pydantic_core

from meshlink.errors import DecodeError, EncodeError
from meshlink.message import FAILURE_PREFIX, RESERVED_HEADERS, Message, new_message_id

__all__ = ["BINARY", "Decoder", "JSON", "check_size", "decoder_for", "encode", "envelope", "type_name"]

T = TypeVar("T")
_NO_HEADERS: Mapping[str, str] = MappingProxyType({})
JSON = "application/json"
BINARY = "application/octet-stream"
_BINARY_TYPES = (bytes, bytearray, memoryview)
_MODEL_DUMP_JSON = pydantic.BaseModel.model_dump_json


def encode(payload: object) -> tuple[bytes, str]:
    """Return ``(body, content_type)`` for ``payload``."""
    if isinstance(payload, pydantic.BaseModel):
        if type(payload).model_dump_json is _MODEL_DUMP_JSON:
            # what model_dump_json() does with its defaults, without the str round trip
            # and the Python wrapper (a third of the cost of encoding a small model)
            return payload.__pydantic_serializer__.to_json(payload), JSON
        return payload.model_dump_json().encode(), JSON  # overridden: the model's own way
    if isinstance(payload, _BINARY_TYPES):
        return bytes(payload), BINARY
    try:
        return pydantic_core.to_json(payload), JSON
    except pydantic_core.PydanticSerializationError as exc:
        raise EncodeError(f"cannot encode {type(payload).__name__} as JSON: {exc}") from exc


def check_size(message: Message, limit: int) -> None:
    """Refuse ``message`` if its body is over ``limit`` bytes (``max_body_bytes``), before any
    transport or store sees it: brokers' own limits differ (Kafka's client 1 MiB, RabbitMQ
    closes the channel past its frame limit), this one is the same everywhere.

    Raises:
        EncodeError: the body is too large (nothing was sent or written).
    """
    if len(message.body) > limit:
        raise EncodeError(
            f"body of {len(message.body)} bytes is over max_body_bytes ({limit}); nothing was sent",
            message_id=message.id,
        )


def envelope(
    payload: object,
    *,
    source: str,
    key: str | None = None,
    headers: Mapping[str, str] | None = None,
    type: str | None = None,
    idempotency_key: str | None = None,
    correlation_id: str | None = None,
    causation_id: str | None = None,
) -> Message:
    """Encode ``payload`` into a new :class:`~meshlink.Message` (a ready one is kept, with ``key``).

    Raises:
        EncodeError: the payload cannot be encoded, or ``headers`` name envelope fields.
    """
    if isinstance(payload, Message):
        return payload if key is None or payload.key == key else payload.replace(key=key)
    if headers:
        bad = RESERVED_HEADERS.intersection(headers) | {h for h in headers if h.startswith(FAILURE_PREFIX)}
        if bad:
            raise EncodeError(
                f"headers {sorted(bad)} are envelope fields; use the keyword arguments of publish() instead"
            )
    body, content_type = encode(payload)
    msg_id = new_message_id()
    return Message._trusted(
        body,
        type if type is not None else type_name(payload),
        msg_id,
        source,
        datetime.now(UTC),
        key,
        content_type,
        correlation_id,
        causation_id,
        idempotency_key or msg_id,
        1,
        MappingProxyType(dict(headers)) if headers else _NO_HEADERS,
    )


def type_name(payload: object) -> str:
    """The default ``ce_type`` of a payload: its class name for models, else empty."""
    if isinstance(payload, pydantic.BaseModel):
        return type(payload).__name__
    return ""


class Decoder:
    """Decodes bodies into one target type; built once per subscription."""

    __slots__ = ("_decode", "target")

    def __init__(self, target: Any) -> None:
        self.target = target
        self._decode: Callable[[bytes], Any]
        if target is bytes:
            self._decode = _identity
        elif isinstance(target, type) and issubclass(target, pydantic.BaseModel):
            # what model_validate_json calls, without its frame: this runs for every message
            self._decode = target.__pydantic_validator__.validate_json
        else:
            self._decode = _adapter(target).validate_json

    def __call__(self, body: bytes) -> Any:
        try:
            return self._decode(body)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise self.failure(exc) from exc

    @property
    def validate(self) -> Callable[[bytes], Any]:
        """The bare decoding call (raises ``ValueError``; see :meth:`failure`), for a caller
        that runs it for every message and saves this object's frame."""
        return self._decode

    def failure(self, exc: ValueError) -> DecodeError:
        """The :class:`DecodeError` for what :attr:`validate` raised."""
        if isinstance(exc, pydantic.ValidationError):
            return DecodeError(
                f"body does not fit {getattr(self.target, '__name__', self.target)}: {_summarise(exc)}"
            )
        return DecodeError(f"body is not valid JSON: {exc}")  # pydantic reports JSON errors itself


def decoder_for(target: type[T]) -> Decoder:
    """Return a :class:`Decoder` for ``target``."""
    return Decoder(target)


def _identity(body: bytes) -> bytes:
    return body


@lru_cache(maxsize=256)
def _adapter(target: Any) -> pydantic.TypeAdapter[Any]:
    return pydantic.TypeAdapter(target)


def _summarise(exc: pydantic.ValidationError) -> str:
    errors = exc.errors(include_url=False)
    parts = []
    for err in errors[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "body"
        parts.append(f"{loc}: {err.get('msg')}")
    more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more
