"""The relay's batches: claim, publish and settle, with the store and the broker overlapped.

Two lanes while rows keep coming::

    broker lane:   publish N                    publish N+1                  …
    store lane:    settle N-1 ‖ claim N+1       settle N ‖ claim N+2         …

The claim of N+1 excludes the rows in flight (N, and N-1 being settled on
another connection) and gets the later rows of their keys (their heads are
this relay's): those go out after N, since batches are published one after the
other. The overlap goes on only while every batch goes through whole: a row
that failed or was given back, a broker outage, a store error, pause or stop
drains the pipeline (the batch is settled, the prefetched one given back
untouched) and the next claim starts afresh from what the store knows. So a
key's row never overtakes an earlier row of the key that did not get through.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import structlog

from meshlink.clock import Clock
from meshlink.errors import CircuitOpenError
from meshlink.events import Event
from meshlink.outbox.batch import Batch, Outcome, RelayCounters, publish_batch
from meshlink.outbox.events import (
    OutboxBatchPublished,
    OutboxBrokerUnavailable,
    OutboxRowFailed,
    OutboxRowMovedAside,
    OutboxStoreUnavailable,
)
from meshlink.outbox.store import OutboxRow, OutboxStore, RowFailure
from meshlink.resilience.breaker import CircuitBreaker
from meshlink.resilience.policy import parse_duration
from meshlink.transport.base import Transport

__all__ = ["BatchLoop"]

_log = structlog.get_logger("meshlink.outbox")


class BatchLoop:
    """Claiming, publishing and settling batches: the working part of :class:`~meshlink.outbox.Relay`."""

    store: OutboxStore
    transport: Transport | None
    clock: Clock
    name: str
    batch_size: int
    lease: float
    poll_interval: float
    max_attempts: int
    retry_backoff: float
    max_retry_backoff: float
    broker_backoff: float
    breaker: CircuitBreaker
    counters: RelayCounters
    _emit: Callable[[Event], None]
    _outages: int
    _backoff: float | None
    _wake: asyncio.Event
    _stopping: asyncio.Event

    @property
    def paused(self) -> bool:
        """Whether the relay is held back."""
        raise NotImplementedError

    async def _maybe_purge(self) -> None:
        """Remove rows sent before the retention period, at most every purge interval."""
        raise NotImplementedError

    async def _store_op(self, operation: str, op: Awaitable[Any]) -> tuple[bool, Any]:
        try:
            return True, await op
        except Exception as exc:
            self.counters.store_errors += 1
            _log.warning(
                "outbox store operation failed", relay=self.name, operation=operation, error=repr(exc)
            )
            self._emit(OutboxStoreUnavailable(relay=self.name, operation=operation, error=exc))
            return False, None

    async def run_once(self) -> int:
        """Claim one batch, publish it and settle it; returns how many rows were claimed.

        Tests call this (it never waits on the clock); the running relay overlaps
        batches instead (see the module docstring).
        """
        self._wake.clear()
        batch = await self._claim(())
        if batch is None or not batch.rows:
            return 0
        await self._settle(await self._publish(batch))
        return len(batch.rows)

    async def _pump(self) -> bool:
        """Publish batch after batch, overlapped with the store; returns whether the outbox is drained."""
        self._wake.clear()
        batch = await self._claim(())
        if batch is None or not batch.rows:
            return batch is not None
        previous: tuple[Outcome, list[int]] | None = None  # published, settled while ``batch`` goes out
        while True:
            self._wake.clear()  # a notification from now on may concern rows the next claim misses
            in_flight = batch.ids + previous[1] if previous else batch.ids
            lane = asyncio.ensure_future(self._store_lane(previous and previous[0], exclude=in_flight))
            try:
                outcome = await self._publish(batch)
            except BaseException:
                lane.cancel()  # cancelled by stop(): the rows stay leased and go out again later
                raise
            settled, following = await lane
            more = following is not None and bool(following.rows)
            if settled and outcome.clean and more and not (self._stopping.is_set() or self.paused):
                assert following is not None
                previous, batch = (outcome, batch.ids), following
                await self._maybe_purge()  # under constant load this loop never ends
                continue
            # drain: anything but a clean batch ends the overlap (what follows was claimed before
            # the store knew this batch's outcome), then the next claim starts afresh
            await self._settle(outcome)
            if following is not None and more:
                await self._store_op("release", self.store.release(self.name, following.ids))
            return following is not None and not more and outcome.clean

    async def _store_lane(self, previous: Outcome | None, *, exclude: list[int]) -> tuple[bool, Batch | None]:
        """Settle the previous batch and claim the next one side by side (unless stopping)."""

        async def settle() -> bool:
            return previous is None or await self._settle(previous)

        async def claim() -> Batch | None:
            if self._stopping.is_set() or self.paused:
                return None
            return await self._claim(exclude)

        settled, following = await asyncio.gather(settle(), claim())
        return settled, following

    async def _claim(self, exclude: Collection[int]) -> Batch | None:
        """A batch (``None`` when the store failed: the relay backs off)."""
        deadline = self.clock.monotonic() + self.lease * 0.8  # never publish on a lease about to lapse
        ok, rows = await self._store_op(
            "claim",
            self.store.claim(
                self.name, limit=self.batch_size, lease=self.lease, now=self.clock.time(), exclude=exclude
            ),
        )
        if not ok:
            self._backoff = max(self.poll_interval, 0.1)
            return None
        if rows:
            self.counters.batches += 1
        return Batch(rows, deadline)

    # -- one batch -----------------------------------------------------------------------------

    async def _publish(self, batch: Batch) -> Outcome:
        assert self.transport is not None
        outcome = await publish_batch(
            batch.rows,
            transport=self.transport,
            breaker=self.breaker,
            clock=self.clock,
            deadline=batch.deadline,
            failure=self._failure,
        )
        if outcome.sent:
            self._emit(
                OutboxBatchPublished(relay=self.name, ids=tuple(outcome.sent), claimed=len(batch.rows))
            )
        return outcome

    async def _settle(self, outcome: Outcome) -> bool:
        """Mark, record and give back what ``outcome`` says; returns whether the store took it all."""
        ok = True
        if outcome.sent:
            done, _ = await self._store_op(
                "mark_sent", self.store.mark_sent(self.name, outcome.sent, now=self.clock.time())
            )
            if done:
                self.counters.published += len(outcome.sent)
            ok = ok and done
        if outcome.failures:
            ok = await self._record(outcome.failures) and ok
        if outcome.give_back:
            done, _ = await self._store_op("release", self.store.release(self.name, outcome.give_back))
            ok = ok and done
        outage = outcome.outage
        if outage is not None and not isinstance(outage, CircuitOpenError):
            wait = min(self.broker_backoff * 2**self._outages, self.breaker_reset)
            self._outages += 1
            self.counters.broker_outages += 1
            _log.warning("broker unavailable; backing off", relay=self.name, wait=wait, error=repr(outage))
            self._emit(OutboxBrokerUnavailable(relay=self.name, error=outage, wait=wait))
            self._backoff = wait
        elif outcome.sent:
            self._outages = 0
        return ok

    @property
    def breaker_reset(self) -> float:
        """The breaker's open time: the longest broker backoff."""
        return parse_duration(self.breaker.config.reset, setting="breaker.reset")

    def _failure(self, row: OutboxRow, error: BaseException, permanent: bool) -> RowFailure:
        delay = min(self.retry_backoff * 2**row.attempts, self.max_retry_backoff)
        reason = f"{type(error).__name__}: {error}"
        self.counters.failed_attempts += 1
        self._emit(
            OutboxRowFailed(
                relay=self.name,
                row_id=row.id,
                attempts=row.attempts + 1,
                error=error,
                retry_at=self.clock.time() + delay,
            )
        )
        return RowFailure(
            id=row.id, reason=reason[:2000], retry_at=self.clock.time() + delay, permanent=permanent
        )

    async def _record(self, failures: list[RowFailure]) -> bool:
        ok, moved = await self._store_op(
            "record_failure",
            self.store.record_failure(
                self.name, failures, now=self.clock.time(), max_attempts=self.max_attempts
            ),
        )
        if not ok:
            return False
        reasons = {f.id: f.reason for f in failures}
        for row_id in moved:
            self.counters.moved_aside += 1
            _log.error("outbox row moved aside", relay=self.name, row_id=row_id, reason=reasons[row_id])
            self._emit(OutboxRowMovedAside(relay=self.name, row_id=row_id, reason=reasons[row_id]))
        return True
