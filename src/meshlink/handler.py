"""Handler registration: what a decorated function declares, checked when it is declared."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from meshlink.codec import Decoder
from meshlink.context import Context
from meshlink.errors import ConfigurationError
from meshlink.message import Message
from meshlink.pipeline import Middleware

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
    concurrency: int
    """Most messages handled at once (also the transport prefetch)."""
    dead_letter: str
    """Destination failed messages are moved to."""
    middleware: Sequence[Middleware] = ()
    """Handler-level middleware, first listed outermost."""
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    """Transport-specific subscription options."""

    def decoder(self) -> Callable[[Message], Any]:
        """Build the body decoder for this handler (once per subscription)."""
        if self.payload_type is Message:
            return _whole_message
        decode = Decoder(self.payload_type)
        return lambda message: decode(message.body)


def _whole_message(message: Message) -> Message:
    return message


def inspect_handler(fn: UserHandler, *, name: str) -> tuple[Any, bool]:
    """Return ``(payload_type, wants_context)`` for ``fn``, or raise ConfigurationError."""
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
    if wants_context:
        second = hints.get(positional[1].name)
        if second is not None and second is not Context:
            raise ConfigurationError(
                "handler", f"{name}: second parameter must be a meshlink.Context, not {second!r}"
            )
    return hints[first.name], wants_context
