"""One claimed batch through the broker: decode, publish in waves, sort each row into an outcome.

A *wave* holds at most one row per key: the first wave has each key's first row
of the batch, the second its second row, and so on. A wave goes out through
``transport.publish_many`` (pipelined, every message confirmed), and a key's next
row is published only once its previous one was confirmed, so keys proceed in
parallel and each key in order. A row that fails holds back the rest of its key
(given back to the store, not attempted).

Every row ends in exactly one list of the :class:`Outcome`: ``sent`` (confirmed),
``failures`` (an attempt to record) or ``give_back`` (untouched). Settling the
outcome is the relay's business (:mod:`meshlink.outbox.relay`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from meshlink.clock import Clock
from meshlink.errors import CircuitOpenError, PublishBatchError, UnroutableError, is_retryable
from meshlink.message import Message
from meshlink.outbox.store import OutboxRow, RowFailure
from meshlink.resilience.breaker import CircuitBreaker
from meshlink.transport.base import Outgoing, Transport

__all__ = ["Batch", "Outcome", "RelayCounters", "decode_row", "publish_batch", "waves"]

Decoded = tuple[OutboxRow, Message]
FailureOf = Callable[[OutboxRow, BaseException, bool], RowFailure]
"""Builds the failure record of a row: ``(row, error, permanent)``."""


def decode_row(row: OutboxRow) -> Message:
    """The envelope stored in ``row``; raises ``ValueError`` for a row that cannot be decoded."""
    headers = json.loads(row.headers)
    if not isinstance(headers, dict):
        raise ValueError("outbox row headers are not a JSON object")
    return Message.from_headers(headers, row.body, key=row.key)


def waves(rows: Sequence[Decoded]) -> list[list[Decoded]]:
    """Split a batch so that each wave has at most one row per key, in id order."""
    first: list[Decoded] = []
    later: list[list[Decoded]] = [first]
    seen: dict[str, int] = {}
    for item in rows:
        key = item[0].key
        if key is None:
            first.append(item)
            continue
        index = seen.get(key, 0)
        seen[key] = index + 1
        if index == len(later):
            later.append([])
        later[index].append(item)
    return later if first else []  # every row's first wave is the first one


@dataclass(slots=True)
class Batch:
    """Rows claimed together."""

    rows: list[OutboxRow]
    deadline: float
    """Monotonic time after which no wave starts (the lease is about to lapse)."""

    @property
    def ids(self) -> list[int]:
        """The rows' ids."""
        return [r.id for r in self.rows]


@dataclass
class RelayCounters:
    """What one relay did since it started (store-wide figures: :meth:`Relay.stats`)."""

    published: int = 0
    """Rows confirmed by the broker."""
    batches: int = 0
    """Non-empty batches claimed."""
    failed_attempts: int = 0
    """Row attempts that failed."""
    moved_aside: int = 0
    """Rows moved to the failed rows."""
    broker_outages: int = 0
    """Waves that failed as a whole (broker down)."""
    store_errors: int = 0
    """Store operations that failed after their retries."""


@dataclass(slots=True)
class Outcome:
    """What became of each row of one batch (every row is in exactly one of the three lists)."""

    claimed: int
    """Rows the batch had."""
    sent: list[int] = field(default_factory=list)
    """Confirmed by the broker: to mark sent."""
    failures: list[RowFailure] = field(default_factory=list)
    """Failed attempts to record."""
    give_back: list[int] = field(default_factory=list)
    """Not attempted (broker down, key held back, lease about to lapse): to release."""
    blocked: set[str] = field(default_factory=set)
    """Keys with a row that did not go through (their later rows were given back)."""
    outage: BaseException | None = None
    """Set when a whole wave failed as if the broker were down (or the breaker is open)."""

    @property
    def clean(self) -> bool:
        """Every row was confirmed."""
        return not self.failures and not self.give_back


async def publish_batch(
    rows: Sequence[OutboxRow],
    *,
    transport: Transport,
    breaker: CircuitBreaker,
    clock: Clock,
    deadline: float,
    failure: FailureOf,
) -> Outcome:
    """Publish ``rows`` (in id order) wave by wave until done, an outage or ``deadline`` (monotonic)."""
    out = Outcome(claimed=len(rows))
    blocked = out.blocked
    decoded: list[Decoded] = []
    for row in rows:
        key = row.key
        if key is not None and key in blocked:
            out.give_back.append(row.id)
            continue
        try:
            decoded.append((row, decode_row(row)))
        except (ValueError, TypeError) as exc:
            out.failures.append(failure(row, exc, True))
            if key is not None:
                blocked.add(key)
    for wave in waves(decoded):
        todo = wave
        if blocked:
            todo = [(r, m) for r, m in wave if r.key is None or r.key not in blocked]
            out.give_back.extend(r.id for r, _ in wave if r.key is not None and r.key in blocked)
        if not todo:
            continue
        if out.outage is not None or clock.monotonic() > deadline:
            _hold_back(todo, out)
            continue
        try:
            breaker.before_call()
        except CircuitOpenError as exc:
            out.outage = exc
            _hold_back(todo, out)
            continue
        await _publish_wave(todo, out, transport, breaker, clock, failure)
    return out


def _hold_back(todo: list[Decoded], out: Outcome) -> None:
    for row, _ in todo:
        out.give_back.append(row.id)
        if row.key is not None:
            out.blocked.add(row.key)


async def _publish_wave(
    todo: list[Decoded],
    out: Outcome,
    transport: Transport,
    breaker: CircuitBreaker,
    clock: Clock,
    failure: FailureOf,
) -> None:
    """Publish one wave; sort each row into sent / failed / given back."""
    now = clock.time()
    items = [
        Outgoing(
            destination=r.destination,
            message=m,
            delay=(r.deliver_at - now) if r.deliver_at is not None and r.deliver_at > now else None,
        )
        for r, m in todo
    ]
    errors: dict[int, BaseException] = {}
    try:
        await transport.publish_many(items)
    except PublishBatchError as exc:
        errors = dict(exc.failures)
    except Exception as exc:
        errors = dict.fromkeys(range(len(items)), exc)
    if not errors:
        out.sent.extend(r.id for r, _ in todo)
        await breaker.record(None)
        return
    confirmed = len(items) - len(errors)
    outage: BaseException | None = None
    for index, (row, _) in enumerate(todo):
        error = errors.get(index)
        if error is None:
            out.sent.append(row.id)
            continue
        if confirmed == 0 and is_retryable(error) and not isinstance(error, UnroutableError):
            outage = error  # nothing went through: the broker, not the row
            out.give_back.append(row.id)
        else:
            out.failures.append(failure(row, error, not is_retryable(error)))
        if row.key is not None:
            out.blocked.add(row.key)
    if outage is not None:
        out.outage = outage
    await breaker.record(outage)
