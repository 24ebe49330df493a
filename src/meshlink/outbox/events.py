"""Events an outbox relay emits to its listeners (a mesh's listeners when embedded)."""

from __future__ import annotations

from dataclasses import dataclass

from meshlink.events import Event

__all__ = [
    "OutboxBatchPublished",
    "OutboxBrokerUnavailable",
    "OutboxRowFailed",
    "OutboxRowMovedAside",
    "OutboxStoreUnavailable",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxBatchPublished(Event):
    """The broker confirmed these rows; they are about to be marked sent (one statement)."""

    relay: str
    ids: tuple[int, ...]
    claimed: int
    """Rows the batch had (some may have failed or been given back)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxRowFailed(Event):
    """Publishing one row failed; it will be tried again after ``retry_at``."""

    relay: str
    row_id: int
    attempts: int
    """Failed attempts including this one."""
    error: BaseException | str
    retry_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxRowMovedAside(Event):
    """A row ran out of attempts (or cannot be decoded) and was moved to the failed rows."""

    relay: str
    row_id: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxBrokerUnavailable(Event):
    """A whole wave failed as if the broker were unreachable; rows were given back untouched."""

    relay: str
    error: BaseException
    wait: float
    """Seconds before the next try (the breaker may pause the relay for longer)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxStoreUnavailable(Event):
    """A store operation failed after its retries; the relay waits and tries again."""

    relay: str
    operation: str
    error: BaseException
