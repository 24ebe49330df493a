"""SQL outbox under faults: each test failed before its fix.

1. A key whose head waits for its retry, with ``limit`` or more rows queued behind it,
   fills the claim's ``LIMIT`` with rows that are then dropped (blocked): other keys'
   claimable rows are never claimed until the retry is due (up to ``max_retry_backoff``,
   per attempt). The store contract says ``claim`` gives up to ``limit`` *claimable*
   rows; the memory store (the reference) does.
2. SQLite reuses a deleted row id (``INTEGER PRIMARY KEY`` without ``AUTOINCREMENT``):
   once the newest row is moved aside, the next row gets its id, and moving that one
   aside too fails on ``outbox_failed``'s primary key. ``record_failure`` raises every
   time, the row stays leased to the relay, which takes it back at once and publishes
   it again and again: the row is stuck for good (and its key with it).
3. ``CircuitBreaker.stop()`` (run when the relay loop ends) forgets its subscriptions, and
   ``Relay.start()`` never attaches the relay again: a relay stopped while the breaker had
   it paused is never resumed after a restart (half-open / close resume nobody), so it
   publishes nothing, silently, for good.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from meshlink.clock import FakeClock
from meshlink.errors import PublishBatchError, UnroutableError
from meshlink.message import Message
from meshlink.outbox import OutboxEntry, Relay, RowFailure
from meshlink.outbox.contract import NOW, entry
from meshlink.outbox.memory import MemoryOutboxStore
from meshlink.outbox.relay import decode_row
from meshlink.transport.base import DeliveryCallback, Outgoing, Subscription, SubscriptionSpec, Transport
from meshlink_sqlalchemy import SqlStores


class RefusingTransport(Transport):
    """Keeps what was confirmed; ``refuse`` says which messages the broker refuses."""

    schemes = ("refusing",)

    def __init__(self, refuse: Callable[[Outgoing], BaseException | None]) -> None:
        self.refuse = refuse
        self.published: list[Outgoing] = []
        self.attempts: list[Outgoing] = []

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def declare(self, destination: str, group: str | None = None) -> None: ...

    async def publish(self, destination: str, message: Message, *, delay: float | None = None) -> None:
        await self.publish_many([Outgoing(destination=destination, message=message, delay=delay)])

    async def publish_many(self, items: Sequence[Outgoing]) -> None:
        self.attempts.extend(items)
        failures = [(i, e) for i, o in enumerate(items) if (e := self.refuse(o)) is not None]
        failed = {i for i, _ in failures}
        self.published.extend(o for i, o in enumerate(items) if i not in failed)
        await asyncio.sleep(0)
        if failures:
            raise PublishBatchError(failures, len(items))

    async def subscribe(self, spec: SubscriptionSpec, on_delivery: DeliveryCallback) -> Subscription:
        raise NotImplementedError


async def _add(stores: SqlStores, entries: Sequence[OutboxEntry]) -> None:
    async with stores.engine.connect() as conn:
        await stores.outbox.add(conn, entries)
        await conn.commit()


def _bodies(rows: Sequence[object]) -> list[int]:
    return [int(decode_row(r).body) for r in rows]  # type: ignore[arg-type]


# -- 1. head-of-line blocking across keys -----------------------------------------------------


async def test_a_key_waiting_for_its_retry_does_not_keep_other_keys_rows_from_being_claimed(
    stores: SqlStores,
) -> None:
    rows = [entry(1, "x"), entry(2, "x"), entry(3, "x"), entry(4, "y")]
    await _add(stores, rows)
    head = await stores.outbox.claim("a", limit=1, lease=30, now=NOW)
    assert _bodies(head) == [1]
    await stores.outbox.record_failure(
        "a", [RowFailure(id=head[0].id, reason="Refused: no", retry_at=NOW + 300)], now=NOW, max_attempts=10
    )

    # the reference store: x waits for its retry, y (claimable) is claimed
    memory = MemoryOutboxStore()
    async with memory.transaction() as tx:
        await memory.add(tx, rows)
    first = await memory.claim("a", limit=1, lease=30, now=NOW)
    await memory.record_failure(
        "a", [RowFailure(id=first[0].id, reason="Refused: no", retry_at=NOW + 300)], now=NOW, max_attempts=10
    )
    assert _bodies(await memory.claim("b", limit=2, lease=30, now=NOW + 1)) == [4]

    # the SQL store locks x's two later rows (the LIMIT), drops them (blocked) and returns nothing
    claimed = await stores.outbox.claim("b", limit=2, lease=30, now=NOW + 1)
    assert _bodies(claimed) == [4], "key y's row is claimable but starved behind key x's retry"


async def test_a_relay_keeps_publishing_other_keys_while_one_key_waits_for_its_retry(
    stores: SqlStores,
) -> None:
    clock = FakeClock(NOW)
    transport = RefusingTransport(lambda o: UnroutableError("no queue") if o.message.body == b"1" else None)
    relay = Relay(stores.outbox, transport, clock=clock, batch_size=2, retry_backoff="5m")
    await _add(stores, [entry(1, "x"), entry(2, "x"), entry(3, "x"), entry(4, "y")])

    assert await relay.run_once() == 2  # x1 refused (retry in 5 min), x2 given back
    assert relay.counters.failed_attempts == 1
    await relay.run_once()

    published = [int(o.message.body) for o in transport.published]
    assert 4 in published, "key y's row waits for key x's retry (5 minutes) although y is unrelated"


# -- 2. SQLite row id reuse ------------------------------------------------------------------------


async def test_sqlite_a_row_moved_aside_under_a_reused_id_is_moved_aside(sqlite_stores: SqlStores) -> None:
    store = sqlite_stores.outbox
    await _add(sqlite_stores, [entry(1)])
    first = await store.claim("a", limit=10, lease=30, now=NOW)
    moved = await store.record_failure(
        "a", [RowFailure(id=first[0].id, reason="bad", retry_at=NOW, permanent=True)], now=NOW, max_attempts=3
    )
    assert moved == [first[0].id]

    await _add(sqlite_stores, [entry(2)])  # the newest row is gone: SQLite hands out its id again
    second = await store.claim("a", limit=10, lease=30, now=NOW)
    assert _bodies(second) == [2]
    failure = RowFailure(id=second[0].id, reason="bad", retry_at=NOW, permanent=True)
    assert await store.record_failure("a", [failure], now=NOW, max_attempts=3) == [second[0].id]
    assert [f.body for f in await store.list_failed()] == [b"1", b"2"]
    assert await store.list_pending() == []


async def test_sqlite_a_relay_does_not_republish_a_refused_row_forever(sqlite_stores: SqlStores) -> None:
    clock = FakeClock(NOW)
    transport = RefusingTransport(
        lambda o: UnroutableError("no queue") if o.destination == "nowhere" else None
    )
    relay = Relay(sqlite_stores.outbox, transport, clock=clock, max_attempts=1)
    await _add(sqlite_stores, [entry(1, destination="nowhere")])
    await relay.run_once()
    assert relay.counters.moved_aside == 1

    await _add(sqlite_stores, [entry(2, destination="nowhere")])
    for _ in range(3):
        await relay.run_once()
    assert relay.counters.store_errors == 0
    assert relay.counters.moved_aside == 2
    assert len(transport.attempts) == 2, "the refused row is taken back and published on every claim"
    assert await sqlite_stores.outbox.list_pending() == []


# -- 3. a relay restarted while its breaker is open stays paused for good ---------------------------


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Await ``condition`` on progress (event-loop turns); the timeout only guards against a hang."""

    async def wait() -> None:
        while not condition():  # noqa: ASYNC110 - the relay's progress is read, no event reports it
            await asyncio.sleep(0.01)

    await asyncio.wait_for(wait(), timeout)


async def test_a_relay_stopped_while_the_broker_was_down_publishes_again_after_a_restart(
    sqlite_stores: SqlStores,
) -> None:
    from meshlink.resilience.breaker import Breaker

    clock = FakeClock(NOW)
    down = True
    transport = RefusingTransport(lambda o: ConnectionError("broker down") if down else None)
    relay = Relay(
        sqlite_stores.outbox,
        transport,
        clock=clock,
        breaker=Breaker(failures=1, reset="5s"),
        poll_interval="1s",
    )
    await _add(sqlite_stores, [entry(1, "x")])
    await relay.start()
    await _until(lambda: relay.breaker.state == "open" and relay.paused)
    await relay.stop()  # e.g. the service (mesh) is restarted during the outage

    down = False
    await relay.start()
    try:
        await clock.wait_for_sleepers(1)  # the breaker's open timer (re-armed by start)
        await clock.advance(6)  # past the reset: half-open, the relay must try again
        assert relay.breaker.state == "half-open"
        # breaker.stop() (in the relay's first run) forgot the relay as a subscription, so
        # the half-open (and a later close) never resumes it: paused for good
        await _until(lambda: len(transport.published) == 1)
    finally:
        await relay.stop()
