"""The relay: order, confirmation, failures, breaker, wake-ups, shutdown (memory store, scripted broker)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Collection, Sequence
from typing import Any

from meshlink import Breaker, FakeClock
from meshlink.errors import PublishError, UnroutableError
from meshlink.outbox import (
    MemoryOutboxStore,
    Outbox,
    OutboxBatchPublished,
    OutboxRow,
    OutboxRowMovedAside,
    Relay,
)
from meshlink.transport.base import Outgoing

from .helpers import Recorder, ScriptedTransport


async def write(outbox: Outbox, store: MemoryOutboxStore, items: list[tuple[str | None, int]]) -> None:
    async with store.transaction() as tx:
        for key, n in items:
            await outbox.publish(tx, "orders", {"n": n}, key=key)


def numbers(transport: ScriptedTransport) -> list[int]:
    return [json.loads(m.body)["n"] for m in transport.published]


async def test_a_keys_rows_go_out_one_wave_after_another_and_are_marked_sent(
    transport: ScriptedTransport, fake_clock: FakeClock
) -> None:
    store = MemoryOutboxStore()
    outbox = Outbox(store, clock=fake_clock)
    await write(outbox, store, [("x", 1), ("y", 2), ("x", 3), (None, 4), ("x", 5)])
    relay = Relay(store, transport, clock=fake_clock)
    assert await relay.run_once() == 5
    waves = [[json.loads(o.message.body)["n"] for o in call] for call in transport.calls]
    assert waves == [[1, 2, 4], [3], [5]]  # x's rows each after the previous was confirmed
    stats = await store.stats(now=fake_clock.time())
    assert (stats.pending, stats.sent) == (0, 5)
    assert relay.counters.published == 5


async def test_a_broker_outage_gives_rows_back_untouched_and_the_breaker_pauses_the_relay(
    transport: ScriptedTransport, fake_clock: FakeClock
) -> None:
    store = MemoryOutboxStore()
    await write(Outbox(store, clock=fake_clock), store, [("x", 1), ("x", 2), (None, 3)])
    relay = Relay(store, transport, clock=fake_clock, breaker=Breaker(failures=2, reset="10s"))
    await relay.breaker.start()
    transport.fail = lambda o: PublishError("link down")
    assert await relay.run_once() == 3
    assert await relay.run_once() == 3
    assert relay.paused
    pending = await store.list_pending()
    assert [r.attempts for r in pending] == [0, 0, 0]  # the rows are not to blame
    assert (await store.stats(now=fake_clock.time())).in_flight == 0  # nothing left leased
    transport.fail = lambda o: None
    await fake_clock.wait_for_sleepers(1)  # the breaker's open timer
    await fake_clock.advance(10)  # half-open: one trial
    assert relay.breaker.state == "half-open"
    await relay.run_once()
    await relay.run_once()
    assert sorted(numbers(transport)) == [1, 2, 3]
    assert numbers(transport).index(1) < numbers(transport).index(2)
    await relay.breaker.stop()


async def test_a_refused_row_is_retried_then_moved_aside_while_other_keys_go_on(
    transport: ScriptedTransport, fake_clock: FakeClock, recorder: Recorder
) -> None:
    store = MemoryOutboxStore()
    outbox = Outbox(store, clock=fake_clock)
    async with store.transaction() as tx:
        await outbox.publish(tx, "nowhere", {"n": 1}, key="x")
        await outbox.publish(tx, "orders", {"n": 2}, key="x")
        await outbox.publish(tx, "orders", {"n": 3}, key="y")
    transport.fail = lambda o: UnroutableError("no route") if o.destination == "nowhere" else None
    relay = Relay(store, transport, clock=fake_clock, max_attempts=2, retry_backoff=1, emit=recorder)
    await relay.run_once()
    assert numbers(transport) == [3]  # x held back behind its failed head
    await fake_clock.advance(1)
    await relay.run_once()
    moved = recorder.of(OutboxRowMovedAside)
    assert len(moved) == 1
    assert "UnroutableError: no route" in moved[0].reason  # type: ignore[attr-defined]
    [failed] = await store.list_failed()
    assert (failed.destination, failed.attempts) == ("nowhere", 2)
    await relay.run_once()
    assert numbers(transport) == [3, 2]


async def test_an_undecodable_row_is_moved_aside_at_once(
    transport: ScriptedTransport, fake_clock: FakeClock
) -> None:
    store = MemoryOutboxStore()
    bad = OutboxRow(
        id=0, destination="d", key="k", headers="{bad", body=b"", created_at=0, deliver_at=None, attempts=0
    )
    store.insert_raw(bad)
    relay = Relay(store, transport, clock=fake_clock)
    await relay.run_once()
    [failed] = await store.list_failed()
    assert failed.reason.startswith("JSONDecodeError")
    assert transport.calls == []


async def test_a_delayed_message_is_handed_to_the_broker_with_the_remaining_delay(
    transport: ScriptedTransport, fake_clock: FakeClock
) -> None:
    store = MemoryOutboxStore()
    async with store.transaction() as tx:
        await Outbox(store, clock=fake_clock).publish(tx, "orders", {"n": 1}, delay="10s")
    await fake_clock.advance(4)
    await Relay(store, transport, clock=fake_clock).run_once()
    assert transport.calls[0][0].delay == 6


async def test_the_relay_wakes_on_commit_and_stops_gracefully(
    transport: ScriptedTransport, fake_clock: FakeClock, recorder: Recorder
) -> None:
    store = MemoryOutboxStore()
    relay = Relay(store, transport, clock=fake_clock, emit=recorder)  # the fake clock never polls
    await relay.start()
    await write(Outbox(store, clock=fake_clock), store, [("x", 1), ("x", 2)])
    await recorder.until(lambda: len(recorder.of(OutboxBatchPublished)) == 1)
    await relay.stop()  # settles the batch in hand
    assert not relay.running
    assert relay.counters.published == 2
    await write(Outbox(store, clock=fake_clock), store, [("x", 3)])
    assert len(await store.list_pending()) == 1  # a stopped relay publishes nothing


async def test_a_lapsing_lease_stops_the_batch_and_gives_the_rest_back(fake_clock: FakeClock) -> None:
    store = MemoryOutboxStore()
    await write(Outbox(store, clock=fake_clock), store, [("x", 1), ("x", 2)])

    class Slow(ScriptedTransport):
        async def publish_many(self, items: object) -> None:
            await super().publish_many(items)  # type: ignore[arg-type]
            await fake_clock.advance(25)  # past 80% of the 30 s lease

    transport = Slow()
    await Relay(store, transport, clock=fake_clock, lease=30).run_once()
    assert numbers(transport) == [1]
    assert [(r.attempts, r.key) for r in await store.list_pending()] == [(0, "x")]


async def test_a_relay_attached_to_a_mesh_starts_and_stops_with_it(memory_url: str) -> None:
    from meshlink import Mesh
    from meshlink.testing import MeshHarness

    mesh = Mesh(memory_url, service="billing")
    seen: list[int] = []

    @mesh.handler("orders")
    async def take(body: dict[str, int]) -> None:
        seen.append(body["n"])

    store = MemoryOutboxStore()
    relay = Relay(store).attach(mesh)
    async with MeshHarness(mesh) as h:
        assert relay.running
        await write(Outbox(store), store, [("x", 1), ("x", 2)])
        await h.wait_for(lambda _h: len(seen) == 2)
    assert seen == [1, 2]
    assert not relay.running


class ClaimLog(MemoryOutboxStore):
    """A memory store that records what each claim excluded and returned."""

    def __init__(self) -> None:
        super().__init__()
        self.claims: list[tuple[list[int], list[int]]] = []
        self.claimed = asyncio.Event()

    async def claim(
        self, relay: str, *, limit: int, lease: float, now: float, exclude: Collection[int] = ()
    ) -> list[OutboxRow]:
        rows = await super().claim(relay, limit=limit, lease=lease, now=now, exclude=exclude)
        self.claims.append((sorted(exclude), [r.id for r in rows]))
        self.claimed.set()
        return rows


class Gated(ScriptedTransport):
    """Holds every publish until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()

    async def publish_many(self, items: Sequence[Outgoing]) -> None:
        self.started.set()
        await self.gate.wait()
        await super().publish_many(items)


async def test_a_running_relay_claims_the_next_batch_while_one_is_published_and_keeps_key_order(
    fake_clock: FakeClock, recorder: Recorder
) -> None:
    store, transport = ClaimLog(), Gated()
    await write(Outbox(store, clock=fake_clock), store, [("x", 1), ("y", 2), ("x", 3), ("y", 4), ("x", 5)])
    transport.gate.clear()
    relay = Relay(store, transport, clock=fake_clock, batch_size=2, emit=recorder)
    await relay.start()
    await transport.started.wait()  # batch [1, 2] is being published ...
    while len(store.claims) < 2:
        store.claimed.clear()
        await store.claimed.wait()
    assert store.claims[1] == ([1, 2], [3, 4])  # ... and the next one was claimed meanwhile
    transport.gate.set()
    await recorder.until(lambda: sum(len(e.ids) for e in recorder.of(OutboxBatchPublished)) == 5)  # type: ignore[attr-defined]
    await relay.stop()
    assert numbers(transport) == [1, 2, 3, 4, 5]
    assert [len(call) for call in transport.calls] == [2, 2, 1]  # one wave per batch: keys in parallel
    assert (await store.stats(now=fake_clock.time())).sent == 5


async def test_a_row_that_fails_in_flight_holds_back_its_keys_rows_claimed_behind_it(
    fake_clock: FakeClock, recorder: Recorder
) -> None:
    store = ClaimLog()
    await write(Outbox(store, clock=fake_clock), store, [("x", 1), ("x", 2), ("x", 3)])
    transport = Gated()
    transport.gate.clear()
    refused: list[int] = []

    def refuse_first(o: Outgoing) -> BaseException | None:
        n = json.loads(o.message.body)["n"]
        if n == 1 and not refused:
            refused.append(n)
            return UnroutableError("no route yet")
        return None

    transport.fail = refuse_first
    relay = Relay(store, transport, clock=fake_clock, batch_size=1, retry_backoff=1, emit=recorder)
    await relay.start()
    while len(store.claims) < 2:  # row 2 claimed behind row 1, which is in flight
        store.claimed.clear()
        await store.claimed.wait()
    transport.gate.set()
    await fake_clock.wait_for_sleepers(1)  # row 1 failed: row 2 given back, the relay waits to poll
    assert numbers(transport) == []
    assert [r.id for r in await store.list_pending()] == [1, 2, 3]
    await fake_clock.advance(1)  # row 1's retry is due
    await recorder.until(lambda: sum(len(e.ids) for e in recorder.of(OutboxBatchPublished)) == 3)  # type: ignore[attr-defined]
    await relay.stop()
    assert numbers(transport) == [1, 2, 3]


async def test_sent_rows_are_purged_under_constant_load_too(
    transport: ScriptedTransport, fake_clock: FakeClock
) -> None:
    """Every claim finds a full batch (the outbox is never drained): sent rows must still be
    purged every purge_interval, or the table grows for good."""

    class Busy(MemoryOutboxStore):
        purges = 0

        async def claim(self, relay: str, **kwargs: Any) -> list[OutboxRow]:
            async with self.transaction() as tx:
                for n in range(kwargs["limit"]):
                    await outbox.publish(tx, "orders", {"n": n})
            return await super().claim(relay, **kwargs)

        async def purge(self, *, sent_before: float, limit: int = 10_000) -> int:
            Busy.purges += 1
            return await super().purge(sent_before=sent_before, limit=limit)

    store = Busy()
    outbox = Outbox(store, clock=fake_clock)
    relay = Relay(store, transport, clock=fake_clock, batch_size=2, purge_interval="10s", retention="1s")

    async def until(condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(10):
            while not condition():  # noqa: ASYNC110 - the relay's progress is read, no event reports it
                await asyncio.sleep(0)

    await relay.start()
    try:
        await until(lambda: Busy.purges >= 1 and len(transport.published) >= 10)
        await fake_clock.advance(11)
        await until(lambda: Busy.purges >= 2)
        await fake_clock.advance(11)
        await until(lambda: Busy.purges >= 3)
    finally:
        await relay.stop()
    stats = await store.stats(now=fake_clock.time())
    assert stats.sent < len(transport.published)  # some sent rows were purged meanwhile
