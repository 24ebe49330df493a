"""The relay: moves committed outbox rows to the broker, in order, with confirmation.

One batch: claim (with a lease) → publish in waves (:mod:`meshlink.outbox.batch`) →
settle: mark the sent rows (one statement), record failures, give the rest back.
Running, the relay overlaps the store and the broker (:mod:`meshlink.outbox.pipeline`).

Failure classes:

* the whole wave failed with a transient error → the broker is down: nothing is
  counted against the rows (they are given back, same place in line), the
  breaker counts a failure and the relay backs off; an open breaker pauses the
  relay until its half-open trial;
* some rows failed while others went through, or the broker refused a row
  (unroutable, too large) → an attempt is recorded on the row, which is retried
  after an exponential delay and moved aside once the budget is spent; a row
  that cannot be decoded is moved aside at once (retrying cannot help).

The relay wakes on the store's notifications (PostgreSQL ``LISTEN/NOTIFY``) and
polls every ``poll_interval`` as a fallback. :meth:`Relay.stop` finishes the
batch in hand and returns; a relay killed mid-batch leaves its rows leased, and
they are published again once the lease expires — duplicates, never loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import structlog

from meshlink.clock import Clock, SystemClock
from meshlink.errors import ConfigurationError
from meshlink.events import Event, MeshDraining
from meshlink.outbox.batch import RelayCounters, decode_row
from meshlink.outbox.pipeline import BatchLoop
from meshlink.outbox.store import OutboxStats, OutboxStore
from meshlink.resilience.breaker import Breaker, CircuitBreaker
from meshlink.resilience.policy import parse_duration
from meshlink.transport.base import Transport

if TYPE_CHECKING:
    from meshlink.app import Mesh

__all__ = ["Relay", "RelayCounters", "decode_row"]

_log = structlog.get_logger("meshlink.outbox")
_OPEN = "open"  # the breaker state (pybreaker's name) in which the relay waits
Duration = float | str


class Relay(BatchLoop):
    """Publishes an outbox's rows. Run several side by side on PostgreSQL; one on SQLite.

    Args:
        store: the outbox store.
        transport: a connected transport (set by :meth:`attach` when embedded in a mesh).
        clock: time source (leases, backoff, polling).
        batch_size: most rows claimed at once.
        lease: how long a claim lasts; a dead relay's rows are published again after it.
        poll_interval: longest wait between claims when no notification comes.
        max_attempts: failed attempts after which a row is moved aside.
        retry_backoff: wait before a failed row's second attempt; doubles per attempt.
        max_retry_backoff: longest wait between attempts of a row.
        breaker: the breaker that pauses the relay while the broker is down.
        broker_backoff: first wait after a broker outage; doubles while it lasts.
        retention: how long sent rows are kept before :meth:`purge` deletes them.
        purge_interval: how often the relay purges.
        name: relay name in the store's claims; unique per process by default.
        emit: where events go (a mesh's ``emit`` when embedded).
    """

    def __init__(
        self,
        store: OutboxStore,
        transport: Transport | None = None,
        *,
        clock: Clock | None = None,
        batch_size: int = 500,
        lease: Duration = "30s",
        poll_interval: Duration = "1s",
        max_attempts: int = 10,
        retry_backoff: Duration = "1s",
        max_retry_backoff: Duration = "5m",
        breaker: Breaker | None = None,
        broker_backoff: Duration = "200ms",
        retention: Duration = "1h",
        purge_interval: Duration = "1m",
        name: str | None = None,
        emit: Callable[[Event], None] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigurationError("batch_size", f"must be >= 1, got {batch_size}")
        if max_attempts < 1:
            raise ConfigurationError("max_attempts", f"must be >= 1, got {max_attempts}")
        self.store = store
        self.transport = transport
        self.clock: Clock = clock or SystemClock()
        self.batch_size = batch_size
        self.lease = parse_duration(lease, setting="lease")
        if self.lease <= 0:
            raise ConfigurationError("lease", "must be > 0")
        self.poll_interval = parse_duration(poll_interval, setting="poll_interval")
        self.max_attempts = max_attempts
        self.retry_backoff = parse_duration(retry_backoff, setting="retry_backoff")
        self.max_retry_backoff = parse_duration(max_retry_backoff, setting="max_retry_backoff")
        self.broker_backoff = parse_duration(broker_backoff, setting="broker_backoff")
        self.retention = parse_duration(retention, setting="retention")
        self.purge_interval = parse_duration(purge_interval, setting="purge_interval")
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._emit = emit or (lambda event: None)
        self.breaker = CircuitBreaker(
            breaker or Breaker(failures=3, reset="5s"),
            name=f"outbox-relay:{self.name}",
            clock=self.clock,
            emit=lambda event: self._emit(event),
        )
        self.breaker.attach(self)
        self.counters = RelayCounters()
        self._outages = 0
        self._backoff: float | None = None
        self._next_purge = 0.0
        self._wake = asyncio.Event()
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- embedding -------------------------------------------------------------------------

    def attach(self, mesh: Mesh) -> Relay:
        """Run inside ``mesh``: its transport, started after it and stopped with it."""
        self.transport = mesh.transport
        self._emit = mesh.emit

        def on_draining(event: Event) -> None:
            if isinstance(event, MeshDraining):
                self._stopping.set()  # no new batch once the mesh begins to close

        mesh.add_listener(on_draining)
        mesh.on_start(self.start)
        mesh.on_stop(self.stop)
        return self

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the relay loop as a task (the transport must be connected)."""
        if self._task is not None and not self._task.done():
            return
        if self.transport is None:
            raise ConfigurationError("transport", "the relay needs a transport (or attach it to a mesh)")
        self._stopping.clear()
        self._resumed.set()  # the breaker's start applies its current state again
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"outbox-relay {self.name}")

    async def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch in hand (up to ``timeout`` seconds), then stop. Idempotent."""
        self._stopping.set()
        task, self._task = self._task, None
        if task is None:
            return
        done, _ = await asyncio.wait([task], timeout=timeout)
        if not done:
            task.cancel()  # rows of the batch stay leased and are published again later
        with contextlib.suppress(asyncio.CancelledError):
            await task

    @property
    def running(self) -> bool:
        """Whether the relay loop is running."""
        return self._task is not None and not self._task.done()

    @property
    def paused(self) -> bool:
        """Whether the breaker holds the relay back."""
        return not self._resumed.is_set() or self.breaker.state == _OPEN

    async def pause(self) -> None:
        """Hold the relay back (its breaker does this while the broker is down)."""
        self._resumed.clear()

    async def resume(self) -> None:
        """Let the relay go on after :meth:`pause`."""
        self._resumed.set()
        self._wake.set()

    def wake(self) -> None:
        """Claim again now instead of at the next poll (store notifications call this)."""
        self._wake.set()

    async def stats(self) -> OutboxStats:
        """Counts and lag of the outbox (store-wide)."""
        return await self.store.stats(now=self.clock.time())

    # -- the loop -------------------------------------------------------------------------------

    async def _run(self) -> None:
        await self.breaker.start()
        watch = None
        try:
            watch = await self.store.watch(self.wake)
        except Exception as exc:
            _log.warning("outbox notifications unavailable; polling", relay=self.name, error=repr(exc))
        _log.info("outbox relay started", relay=self.name, batch_size=self.batch_size)
        try:
            while not self._stopping.is_set():
                if self.paused:
                    await asyncio.sleep(0)  # let the breaker's pause task run before waiting on it
                    await self._wait_any(self._resumed.wait())
                    continue
                drained = await self._pump()
                if not self._stopping.is_set():
                    # every purge_interval, busy or not (the pump purges between batches too):
                    # under constant load the outbox is never drained, and sent rows would pile up
                    await self._maybe_purge()
                backoff, self._backoff = self._backoff, None
                if backoff is not None:
                    await self._wait_any(self.clock.sleep(backoff))
                elif drained and not self._stopping.is_set():
                    await self._wait_any(self._wake.wait(), self.clock.sleep(self.poll_interval))
        finally:
            if watch is not None:
                with contextlib.suppress(Exception):
                    await watch.close()
            await self.breaker.stop()
            _log.info("outbox relay stopped", relay=self.name, published=self.counters.published)

    async def _wait_any(self, *waits: Awaitable[Any]) -> None:
        """Wait for the first of ``waits`` or for stop; the others are cancelled."""
        tasks = [asyncio.ensure_future(w) for w in (*waits, self._stopping.wait())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _maybe_purge(self) -> None:
        now = self.clock.monotonic()
        if now < self._next_purge:
            return
        self._next_purge = now + self.purge_interval
        await self._store_op("purge", self.store.purge(sent_before=self.clock.time() - self.retention))
