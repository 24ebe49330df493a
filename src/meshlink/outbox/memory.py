"""The in-memory outbox store: the contract's reference implementation, for tests and ``memory://``.

Transactions are explicit: ``async with store.transaction() as tx`` collects
what :meth:`MemoryOutboxStore.add` writes and makes it visible only when the
block exits without an exception (a rollback discards it), like a database.
Everything runs in one event loop, and each method completes without awaiting
in between, so every operation is atomic.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

from meshlink.errors import ConfigurationError
from meshlink.outbox.store import (
    FailedRow,
    OutboxEntry,
    OutboxRow,
    OutboxStats,
    OutboxStore,
    RowFailure,
    Watch,
)

__all__ = ["MemoryOutboxStore", "MemoryStores", "MemoryTransaction"]


@dataclass(slots=True)
class _Row:
    row: OutboxRow
    claimed_by: str | None = None
    lease_until: float | None = None
    retry_at: float | None = None
    sent_at: float | None = None
    last_error: str | None = None


class MemoryTransaction:
    """A unit of work on a :class:`MemoryOutboxStore`: commits on a clean exit, else rolls back."""

    def __init__(self, store: MemoryOutboxStore) -> None:
        self.store = store
        self.entries: list[OutboxEntry] = []
        self.done = False

    async def __aenter__(self) -> MemoryTransaction:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.rollback()

    def commit(self) -> None:
        """Make the added rows visible."""
        if not self.done:
            self.done = True
            self.store._commit(self.entries)

    def rollback(self) -> None:
        """Discard the added rows."""
        self.done = True
        self.entries.clear()


class _MemoryWatch:
    def __init__(self, store: MemoryOutboxStore, wake: Callable[[], None]) -> None:
        self._store = store
        self._wake = wake

    async def close(self) -> None:
        if self._wake in self._store._watchers:
            self._store._watchers.remove(self._wake)


class MemoryOutboxStore:
    """An outbox held in this process (lost when it exits): tests and single-process demos."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._rows: dict[int, _Row] = {}
        self._failed: list[FailedRow] = []
        self._watchers: list[Callable[[], None]] = []

    def transaction(self) -> MemoryTransaction:
        """A new transaction for :meth:`add` (``async with store.transaction() as tx``)."""
        return MemoryTransaction(self)

    async def add(self, session: Any, entries: Sequence[OutboxEntry]) -> None:
        if not isinstance(session, MemoryTransaction) or session.store is not self:
            raise ConfigurationError(
                "session", "the memory outbox needs a transaction from store.transaction()"
            )
        if session.done:
            raise ConfigurationError("session", "the transaction has ended")
        session.entries.extend(entries)

    def _commit(self, entries: Sequence[OutboxEntry]) -> None:
        for e in entries:
            row_id = next(self._ids)
            self._rows[row_id] = _Row(
                OutboxRow(
                    id=row_id,
                    destination=e.destination,
                    key=e.message.key,
                    headers=json.dumps(e.message.to_headers()),
                    body=e.message.body,
                    created_at=e.created_at,
                    deliver_at=e.deliver_at,
                    attempts=0,
                )
            )
        if entries:
            for wake in list(self._watchers):
                wake()

    def insert_raw(self, row: OutboxRow) -> int:
        """Add a committed row as given (tests use it to store a bad row); returns its id."""
        row_id = next(self._ids)
        self._rows[row_id] = _Row(replace(row, id=row_id))
        return row_id

    def _unsent(self) -> list[_Row]:
        return [r for r in self._rows.values() if r.sent_at is None]

    async def claim(
        self, relay: str, *, limit: int, lease: float, now: float, exclude: Collection[int] = ()
    ) -> list[OutboxRow]:
        def claimable(r: _Row) -> bool:
            free = r.lease_until is None or r.lease_until < now or r.claimed_by == relay
            return free and (r.retry_at is None or r.retry_at <= now)

        # one pass in id order (dicts keep insertion order), as the SQL statement does: a row
        # is taken when it is free itself and no earlier unsent row of its key is not (leased
        # to another live relay, or waiting for its retry); rows in flight here are skipped
        skip = set(exclude)
        blocked: set[str] = set()
        picked: list[_Row] = []
        for r in self._unsent():
            key = r.row.key
            if key is not None and key in blocked:
                continue
            if not claimable(r):
                if key is not None:
                    blocked.add(key)
                continue
            if r.row.id not in skip:
                picked.append(r)
                if len(picked) == limit:
                    break
        for r in picked:
            r.claimed_by, r.lease_until = relay, now + lease
        return [r.row for r in picked]

    def _mine(self, relay: str, ids: Sequence[int]) -> list[_Row]:
        rows = (self._rows.get(i) for i in ids)
        return [r for r in rows if r is not None and r.claimed_by == relay and r.sent_at is None]

    async def mark_sent(self, relay: str, ids: Sequence[int], *, now: float) -> int:
        mine = self._mine(relay, ids)
        for r in mine:
            r.sent_at, r.claimed_by, r.lease_until = now, None, None
        return len(mine)

    async def release(self, relay: str, ids: Sequence[int]) -> None:
        for r in self._mine(relay, ids):
            r.claimed_by, r.lease_until = None, None

    async def record_failure(
        self, relay: str, failures: Sequence[RowFailure], *, now: float, max_attempts: int
    ) -> list[int]:
        moved: list[int] = []
        for f in failures:
            found = self._mine(relay, [f.id])
            if not found:
                continue
            r = found[0]
            r.row = replace(r.row, attempts=r.row.attempts + 1)
            r.claimed_by, r.lease_until, r.retry_at, r.last_error = None, None, f.retry_at, f.reason
            if f.permanent or r.row.attempts >= max_attempts:
                del self._rows[f.id]
                row = r.row
                self._failed.append(
                    FailedRow(
                        id=row.id,
                        destination=row.destination,
                        key=row.key,
                        headers=row.headers,
                        body=row.body,
                        created_at=row.created_at,
                        attempts=row.attempts,
                        reason=f.reason,
                        failed_at=now,
                    )
                )
                moved.append(f.id)
        return moved

    async def purge(self, *, sent_before: float, limit: int = 10_000) -> int:
        old = [i for i, r in self._rows.items() if r.sent_at is not None and r.sent_at < sent_before][:limit]
        for i in old:
            del self._rows[i]
        return len(old)

    async def stats(self, *, now: float) -> OutboxStats:
        unsent = self._unsent()
        return OutboxStats(
            pending=len(unsent),
            in_flight=sum(1 for r in unsent if r.lease_until is not None and r.lease_until >= now),
            retrying=sum(1 for r in unsent if r.retry_at is not None and r.retry_at > now),
            sent=len(self._rows) - len(unsent),
            failed=len(self._failed),
            oldest_pending_at=min((r.row.created_at for r in unsent), default=None),
            now=now,
        )

    async def list_pending(self, *, limit: int = 100) -> list[OutboxRow]:
        return [r.row for r in self._unsent()[:limit]]

    async def list_failed(self, *, limit: int = 100) -> list[FailedRow]:
        return self._failed[:limit]

    async def watch(self, wake: Callable[[], None]) -> Watch:
        self._watchers.append(wake)
        return _MemoryWatch(self, wake)


class MemoryStores:
    """The ``memory://`` store family (outbox only), as the ``meshlink.stores`` registry builds it."""

    def __init__(self, url: str = "memory://", **options: Any) -> None:
        del url, options
        self._outbox = MemoryOutboxStore()

    @property
    def outbox(self) -> OutboxStore:
        return self._outbox

    async def init(self) -> None:
        """Nothing to create."""

    async def close(self) -> None:
        """Nothing to release."""
