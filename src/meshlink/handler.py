"""Handler registration: what a decorated function declares, checked when it is declared."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from meshlink.batch import Batch, BatchContext, payload_item_type
from meshlink.codec import Decoder
from meshlink.context import Context
from meshlink.errors import ConfigurationError, DecodeError
from meshlink.message import Message
from meshlink.pipeline import Middleware
from meshlink.resilience.defaults import Policies

__all__ = ["HandlerSpec", "UserHandler", "inspect_handler"]

UserHandler = Callable[..., Awaitable[None]]
"""``async def handler(payload: Model[, ctx: Context]) -> None``."""


@dataclass(frozen=True, kw_only=True)
class HandlerSpec:
    """Everything the mesh needs to run one handler."""

    name: str
    """Unique handler name (used in logs, events and dead-letter headers)."""
    destination: str
    """Destination the handler consumes."""
    group: str
    """Consumer group (durable queue / Kafka group)."""
    fn: UserHandler
    """The user's coroutine function."""
    payload_type: Any
    """Type of the first parameter: a pydantic model, ``Message``, ``bytes`` or any pydantic-able type."""
    wants_context: bool
    """Whether ``fn`` takes the :class:`~meshlink.context.Context` as second argument."""
    policies: Policies
    """Retry, timeout, bulkhead, breaker and idempotency of this handler."""
    dead_letter: str
    """Destination failed messages are moved to."""
    retry_destination: str
    """Destination redelivered messages come back through (consumed by this handler's group only)."""
    middleware: Sequence[Middleware] = ()
    """Handler-level middleware, first listed outermost."""
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    """Transport-specific subscription options."""
    batch: Batch | None = None
    """For a batch handler (``fn`` takes ``list[payload_type]``): how batches are formed."""

    @property
    def concurrency(self) -> int:
        """Most messages handled at once (also the transport prefetch); batches for a batch handler."""
        return self.policies.concurrency

    @property
    def prefetch(self) -> int:
        """Most deliveries a subscription of this handler holds unsettled."""
        if self.batch is None:
            return self.policies.concurrency
        return self.policies.concurrency * self.batch.max_size

    def decoder(self) -> Callable[[Message], Any]:
        """Build the body decoder for this handler (once per subscription).

        Refuses, as permanent DecodeErrors: bodies over the size limit, and a
        content type the target cannot be decoded from (JSON for typed payloads).
        """
        decode = self.wire_decoder()
        if self.payload_type is Message:

            def decode_message(message: Message) -> Any:
                decode(message.body, message.content_type)  # the size check
                return message

            return decode_message
        return lambda message: decode(message.body, message.content_type)

    def wire_decoder(self) -> Callable[[bytes, str], Any]:
        """The decoder of :meth:`decoder` taking the body and its content type (what
        :meth:`Delivery.wire` gives without rebuilding the envelope). For a ``Message``
        payload it only checks the size (and returns ``True``)."""
        limit = self.policies.max_body_bytes
        raw = self.payload_type is Message or self.payload_type is bytes
        try:
            decode = None if raw else Decoder(self.payload_type)
        except Exception as exc:  # e.g. a type pydantic has no schema for
            raise ConfigurationError(
                "handler", f"{self.name}: cannot decode a body into {self.payload_type!r}: {exc}"
            ) from exc
        wants_message = self.payload_type is Message
        if decode is None:

            def decode_raw(body: bytes, content_type: str) -> Any:
                if len(body) > limit:
                    raise DecodeError(f"body of {len(body)} bytes is over the {limit}-byte limit")
                return True if wants_message else body

            return decode_raw
        # called for every message: the validator is called bare, JSON is checked first
        validate, failure = decode.validate, decode.failure

        def decode_wire(body: bytes, content_type: str) -> Any:
            if len(body) > limit:
                raise DecodeError(f"body of {len(body)} bytes is over the {limit}-byte limit")
            if content_type != "application/json" and not _is_json(content_type):
                raise DecodeError(f"cannot decode content type {content_type!r} as JSON")
            try:
                return validate(body)
            except ValueError as exc:
                raise failure(exc) from exc

        return decode_wire


def _is_json(content_type: str) -> bool:
    if content_type == "application/json":  # nearly every message: skip the parsing below
        return True
    base = content_type.split(";", 1)[0].strip().lower()
    return base in ("application/json", "text/json", "") or base.endswith("+json")


def inspect_handler(fn: UserHandler, *, name: str, batch: bool = False) -> tuple[Any, bool]:
    """Return ``(payload_type, wants_context)`` for ``fn``, or raise ConfigurationError.

    For a batch handler the first parameter is ``list[T]`` (or ``Sequence[T]``) and
    ``T`` is returned; its context is a :class:`~meshlink.batch.BatchContext`."""
    if not inspect.iscoroutinefunction(fn):
        raise ConfigurationError("handler", f"{name} must be an async function (async def)")
    params = list(inspect.signature(fn).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required_other = [
        p for p in params if p not in positional and p.default is p.empty and p.kind == p.KEYWORD_ONLY
    ]
    if not positional or len(positional) > 2 or required_other:
        raise ConfigurationError(
            "handler",
            f"{name} must take (payload) or (payload, ctx); it takes ({', '.join(p.name for p in params)})",
        )
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:
        raise ConfigurationError("handler", f"cannot resolve the type hints of {name}: {exc}") from exc
    first = positional[0]
    if first.name not in hints:
        raise ConfigurationError(
            "handler",
            f"{name}: parameter {first.name!r} needs a type annotation "
            "(a pydantic model, Message, bytes, dict…) so the body can be decoded",
        )
    wants_context = len(positional) == 2
    context_type = BatchContext if batch else Context
    if wants_context:
        second = hints.get(positional[1].name)
        if second is not None and second is not context_type and not (batch and second is Context):
            raise ConfigurationError(
                "handler",
                f"{name}: second parameter must be a meshlink.{context_type.__name__}, not {second!r}",
            )
    payload_type = hints[first.name]
    if batch:
        item = payload_item_type(payload_type)
        if item is None:
            raise ConfigurationError(
                "batch",
                f"{name}: a batch handler's first parameter is list[T] (the decoded payloads), "
                f"not {payload_type!r}",
            )
        return item, wants_context
    return payload_type, wants_context
