"""The outbox store contract: what every outbox store (memory, SQL, third-party) implements.

Rows go through four states::

    added (in the caller's transaction; visible once it commits)
      → claimed by one relay, with a lease          (claim)
        → sent                                       (mark_sent; purged after retention)
        → failed attempt, retried later              (record_failure)
          → moved aside with the reason              (after the attempt budget)

Semantics every store guarantees (``tests/outbox/store_contract.py`` checks them):

Adding
    :meth:`OutboxStore.add` writes inside the caller's own transaction (``session``
    is whatever the store works with: an SQLAlchemy ``AsyncSession`` or
    ``AsyncConnection``, a :class:`~meshlink.outbox.memory.MemoryTransaction`).
    Nothing is visible to relays unless that transaction commits. Row ids grow
    with insertion order; **a key's order is the order of its row ids**.

Claiming
    :meth:`OutboxStore.claim` atomically gives up to ``limit`` rows to one relay
    for ``lease`` seconds, in id order. Per-key order: a key's rows are claimable
    only by whoever holds the key's *head* (its earliest unsent row), and the head
    is claimable only when it is not leased to another relay and not waiting for
    a retry. So a row of a key is never handed out while an earlier unsent row of
    that key is held by someone else; the holder gets a prefix of the key's rows
    and publishes them one after the other. Rows without a key have no order and
    are claimed independently. Rows whose lease expired (a dead relay) are claimable
    again: that is where duplicates come from, never loss. A relay re-claiming with
    its own name gets back rows it still holds (a claim whose commit was lost),
    except those in ``exclude``: a relay that claims its next batch while the
    previous one is in flight excludes the rows in flight, and gets the later
    rows of their keys (it holds their heads), which it publishes after them.

Settling
    :meth:`OutboxStore.mark_sent` marks rows sent in one statement;
    :meth:`OutboxStore.release` gives rows back untouched (not attempted);
    :meth:`OutboxStore.record_failure` counts an attempt, stores the reason and
    makes the row wait until its ``retry_at``, or moves it aside (visible through
    :meth:`OutboxStore.list_failed`, never dropped) once ``attempts`` reaches the
    budget or the failure is permanent. All three only touch rows still claimed
    by the named relay.

Housekeeping
    :meth:`OutboxStore.purge` deletes sent rows sent before a time;
    :meth:`OutboxStore.stats` reports counts and lag (age of the oldest unsent row);
    :meth:`OutboxStore.watch` calls a function when rows may have become
    claimable (PostgreSQL ``LISTEN/NOTIFY``, the memory store's commits); relays
    poll as well, so a store without notifications only adds latency.

Times are Unix seconds (floats) passed in by the caller, so every store runs on
an injected clock.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from meshlink.message import Message

__all__ = [
    "FailedRow",
    "OutboxEntry",
    "OutboxRow",
    "OutboxStats",
    "OutboxStore",
    "RowFailure",
    "Stores",
    "Watch",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxEntry:
    """One message to add to the outbox."""

    destination: str
    """Where the relay will publish it."""
    message: Message
    """The envelope (its ``key`` orders it among the key's other rows)."""
    created_at: float
    """When it was written (Unix seconds): lag is measured from here."""
    deliver_at: float | None = None
    """Not deliverable before this time (Unix seconds); the broker holds it (``delay=``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxRow:
    """A claimed row, as stored: the relay decodes it (a row that does not decode is a bad row)."""

    id: int
    """Position in the outbox; a key's order."""
    destination: str
    """Where to publish."""
    key: str | None
    """The message key (ordering)."""
    headers: str
    """The wire headers as a JSON object (``Message.to_headers()``)."""
    body: bytes
    """The encoded payload."""
    created_at: float
    """When the row was written."""
    deliver_at: float | None
    """Deliverable from this time on; ``None`` for at once."""
    attempts: int
    """Failed attempts so far."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RowFailure:
    """A failed attempt to publish one claimed row."""

    id: int
    """The row."""
    reason: str
    """What went wrong (error type and message), kept with the row."""
    retry_at: float
    """Not claimable again before this time (Unix seconds)."""
    permanent: bool = False
    """Retrying cannot help (undecodable row): move aside now, whatever the budget."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FailedRow:
    """A row moved aside after its attempt budget, with the reason."""

    id: int
    destination: str
    key: str | None
    headers: str
    body: bytes
    created_at: float
    attempts: int
    reason: str
    failed_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxStats:
    """Counts and lag of one outbox."""

    pending: int
    """Unsent rows (claimed or not)."""
    in_flight: int
    """Unsent rows under a live lease (a relay is publishing them)."""
    retrying: int
    """Unsent rows waiting for a retry after a failed attempt."""
    sent: int
    """Sent rows still retained."""
    failed: int
    """Rows moved aside."""
    oldest_pending_at: float | None
    """``created_at`` of the oldest unsent row."""
    now: float
    """The time the figures were taken at."""

    @property
    def lag(self) -> float:
        """Age in seconds of the oldest unsent row (0 when nothing is pending)."""
        if self.oldest_pending_at is None:
            return 0.0
        return max(0.0, self.now - self.oldest_pending_at)


class Watch(Protocol):
    """A running notification subscription (see :meth:`OutboxStore.watch`)."""

    async def close(self) -> None:
        """Stop calling the function."""
        ...


@runtime_checkable
class OutboxStore(Protocol):
    """Where outbox rows live. See the module docstring for the semantics."""

    async def add(self, session: Any, entries: Sequence[OutboxEntry]) -> None:
        """Add ``entries`` inside the caller's transaction ``session``."""
        ...

    async def claim(
        self, relay: str, *, limit: int, lease: float, now: float, exclude: Collection[int] = ()
    ) -> list[OutboxRow]:
        """Give up to ``limit`` claimable rows to ``relay`` until ``now + lease``, in id order.

        Rows in ``exclude`` (``relay``'s rows in flight) are not returned; their leases stay as they are.
        """
        ...

    async def mark_sent(self, relay: str, ids: Sequence[int], *, now: float) -> int:
        """Mark rows sent (one statement); returns how many were still ``relay``'s."""
        ...

    async def release(self, relay: str, ids: Sequence[int]) -> None:
        """Give claimed rows back without counting an attempt."""
        ...

    async def record_failure(
        self, relay: str, failures: Sequence[RowFailure], *, now: float, max_attempts: int
    ) -> list[int]:
        """Count a failed attempt per row; move aside those out of budget. Returns the ids moved."""
        ...

    async def purge(self, *, sent_before: float, limit: int = 10_000) -> int:
        """Delete up to ``limit`` rows sent before ``sent_before``; returns how many."""
        ...

    async def stats(self, *, now: float) -> OutboxStats:
        """Counts and lag at ``now``."""
        ...

    async def list_pending(self, *, limit: int = 100) -> list[OutboxRow]:
        """The oldest unsent rows."""
        ...

    async def list_failed(self, *, limit: int = 100) -> list[FailedRow]:
        """Rows moved aside, oldest first."""
        ...

    async def watch(self, wake: Callable[[], None]) -> Watch:
        """Call ``wake()`` whenever rows may have become claimable (best effort)."""
        ...


@runtime_checkable
class Stores(Protocol):
    """What a ``meshlink.stores`` entry point builds from a URL: a family of stores on one database."""

    @property
    def outbox(self) -> OutboxStore:
        """The outbox store."""
        ...

    async def init(self) -> None:
        """Create the tables (idempotent)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
