"""Events a mesh emits to its listeners: the one channel for telemetry.

Policies and the mesh never log, count or trace on their own account beyond a
debug line; logging, metrics, tracing and the test harness subscribe here::

    mesh.add_listener(lambda event: print(event))

Listeners are called synchronously, in the order they were added, and must be
quick; an exception in a listener is logged and otherwise ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from meshlink.message import Message

__all__ = [
    "BreakerStateChanged",
    "DuplicateSkipped",
    "Event",
    "HandlerFailed",
    "Listener",
    "MessageDeadLettered",
    "MessageGivenBack",
    "MessageHandled",
    "MessagePublished",
    "MeshDraining",
    "RedeliveryScheduled",
    "RetryScheduled",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base of every event."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MessagePublished(Event):
    """A message was confirmed by the broker."""

    destination: str
    message: Message
    delay: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageHandled(Event):
    """A handler finished a message successfully (emitted before the ack)."""

    handler: str
    destination: str
    group: str
    message: Message
    payload: object
    duration: float


@dataclass(frozen=True, slots=True, kw_only=True)
class HandlerFailed(Event):
    """A handler raised; what happens next is told by a later event."""

    handler: str
    destination: str
    group: str
    message: Message
    error: BaseException


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryScheduled(Event):
    """A failed try will be retried in process after ``wait`` seconds."""

    handler: str
    message: Message
    attempt: int
    """The execution that failed."""
    wait: float
    error: BaseException | None


@dataclass(frozen=True, slots=True, kw_only=True)
class RedeliveryScheduled(Event):
    """A failed message went back to the broker, deliverable again after ``delay`` seconds."""

    handler: str
    message: Message
    """The message as republished (its ``attempt`` is the next execution)."""
    retry_destination: str
    delay: float
    error: BaseException


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageGivenBack(Event):
    """A message went back to the broker without spending its budget (shutdown, open breaker)."""

    handler: str
    message: Message
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerStateChanged(Event):
    """A circuit breaker moved to ``state`` (``open``, ``half-open`` or ``closed``)."""

    breaker: str
    state: str
    previous: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DuplicateSkipped(Event):
    """A message whose idempotency key was already processed was acked without running."""

    handler: str
    message: Message
    key: str


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageDeadLettered(Event):
    """A message was moved to its dead-letter destination (emitted after the confirm)."""

    handler: str
    destination: str
    dead_letter_destination: str
    message: Message
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class MeshDraining(Event):
    """A stopping mesh has stopped fetching and now waits for running handlers."""

    service: str
    in_flight: int
    deadline: float
    """Seconds the mesh waits before cancelling what still runs."""


Listener = Callable[[Event], None]
