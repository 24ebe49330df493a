"""Every exception meshlink raises, under one root.

The tree::

    MeshlinkError
    ├── ConfigurationError            a setting is wrong; raised at registration or start-up
    ├── TransportError                something between us and the broker failed
    │   ├── TransportConnectionError  the broker cannot be reached (first connect fails fast)
    │   ├── TransportClosedError      the transport or subscription was closed
    │   ├── PublishError              a publish was not confirmed
    │   │   ├── UnroutableError       the broker has nowhere to put the message
    │   │   ├── PublishTimeoutError   outcome unknown: the broker may or may not have it
    │   │   └── PublishBatchError     some messages of a batch were not confirmed
    │   └── DeliveryError             a delivery could not be settled
    │       └── AlreadySettledError   ack/nack/reject called twice for one delivery
    ├── MessageError                  a message cannot be encoded or decoded
    │   ├── EncodeError
    │   └── DecodeError               the body does not fit the handler's type (permanent)
    ├── HandlerTimeoutError           a handler ran past its timeout (transient)
    ├── CircuitOpenError              a circuit breaker refused the call (not a failure of the message)
    ├── DuplicateInProgressError      the same idempotency key is being handled elsewhere (transient)
    └── HandlerSignal                 control flow raised by handlers on purpose
        ├── Reject                    dead-letter this message now, with a reason
        └── RetryLater                try again after a delay

Every error has a ``retryable`` flag: ``False`` means retrying the same message
cannot help (a decode failure, a rejection), so the failure policy dead-letters
it at once. Errors carry their context (destination, message id, handler) as
attributes so listeners and logs need not parse the text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshlink.message import Message

__all__ = [
    "AlreadySettledError",
    "CircuitOpenError",
    "ConfigurationError",
    "DecodeError",
    "DeliveryError",
    "DuplicateInProgressError",
    "EncodeError",
    "HandlerSignal",
    "HandlerTimeoutError",
    "MeshlinkError",
    "MessageError",
    "PublishBatchError",
    "PublishError",
    "PublishTimeoutError",
    "Reject",
    "RetryLater",
    "TransportClosedError",
    "TransportConnectionError",
    "TransportError",
    "UnroutableError",
    "is_retryable",
]


class MeshlinkError(Exception):
    """Root of every meshlink exception."""

    retryable: bool = True

    def __init__(self, message: str, **context: object) -> None:
        super().__init__(message)
        self.context: dict[str, object] = {k: v for k, v in context.items() if v is not None}

    def __str__(self) -> str:
        base = super().__str__()
        if not self.context:
            return base
        extra = ", ".join(f"{k}={v!r}" for k, v in self.context.items())
        return f"{base} ({extra})"


class ConfigurationError(MeshlinkError):
    """A configuration mistake, reported before any message flows.

    Attributes:
        setting: the name of the setting at fault, e.g. ``"url"`` or ``"handler"``.
    """

    retryable = False

    def __init__(self, setting: str, message: str, **context: object) -> None:
        super().__init__(f"{setting}: {message}", **context)
        self.setting = setting


class TransportError(MeshlinkError):
    """Something between meshlink and the broker failed."""


class TransportConnectionError(TransportError):
    """The broker could not be reached (raised by the first connect)."""


class TransportClosedError(TransportError):
    """The transport or subscription has been closed."""


class PublishError(TransportError):
    """A message was not confirmed by the broker.

    Attributes:
        destination: where the message was going.
        message_id: the envelope id of the message.
    """

    def __init__(
        self, message: str, *, destination: str | None = None, message_id: str | None = None
    ) -> None:
        super().__init__(message, destination=destination, message_id=message_id)
        self.destination = destination
        self.message_id = message_id


class UnroutableError(PublishError):
    """The broker had no queue/topic to put the message in."""


class PublishTimeoutError(PublishError):
    """The outcome of a publish is unknown: it may or may not have reached the broker.

    Retrying may therefore duplicate the message; consumers' idempotency absorbs that.
    """


class PublishBatchError(PublishError):
    """Some messages of a ``publish_many`` call were not confirmed.

    Attributes:
        failures: ``(index, error)`` pairs for the messages that failed; every
            other message of the batch was confirmed.
    """

    def __init__(self, failures: Sequence[tuple[int, BaseException]], total: int) -> None:
        super().__init__(f"{len(failures)} of {total} messages were not confirmed")
        self.failures = list(failures)
        self.total = total
        self.messages: list[Message] = []
        """The messages of the call, in order, where the caller built them (``Mesh.publish_many``)."""


class DeliveryError(TransportError):
    """A delivery could not be settled."""


class AlreadySettledError(DeliveryError):
    """A delivery was acked, nacked or rejected twice."""

    retryable = False


class MessageError(MeshlinkError):
    """A message could not be encoded or decoded, or lacks what its handling needs (e.g. a
    reply-to header): retrying the same message cannot help."""

    retryable = False


class EncodeError(MessageError):
    """A payload could not be encoded."""

    retryable = False


class DecodeError(MessageError):
    """A body could not be decoded into the handler's type. Never retried."""

    retryable = False


class HandlerTimeoutError(MeshlinkError):
    """A handler ran past its timeout and was cancelled. Retried like any transient error."""


class CircuitOpenError(MeshlinkError):
    """A circuit breaker is open; the message goes back without spending its budget."""

    def __init__(self, message: str, *, breaker: str, retry_after: float | None = None) -> None:
        super().__init__(message, breaker=breaker, retry_after=retry_after)
        self.breaker = breaker
        self.retry_after = retry_after


class DuplicateInProgressError(MeshlinkError):
    """Another delivery with the same idempotency key is running now; retried later."""


class HandlerSignal(MeshlinkError):
    """Control flow a handler raises on purpose."""


class Reject(HandlerSignal):
    """Raise from a handler to dead-letter the message at once.

    Example:
        >>> raise Reject("customer is blocked")  # doctest: +SKIP
    """

    retryable = False

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RetryLater(HandlerSignal):
    """Raise from a handler to have the message tried again after ``after`` seconds."""

    def __init__(self, after: float, reason: str = "retry requested by handler") -> None:
        super().__init__(reason, after=after)
        self.after = after
        self.reason = reason


def is_retryable(exc: BaseException) -> bool:
    """Tell whether retrying the message could help with ``exc``.

    meshlink's own errors say so through their ``retryable`` flag; any other
    exception is assumed transient.
    """
    return bool(getattr(exc, "retryable", True)) if isinstance(exc, MeshlinkError) else True
