"""The outbox core under faults (memory store, relay, writer): each test failed before its fix.

Memory store, scripted transport, FakeClock; deterministic.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest

from meshlink import FakeClock
from meshlink.errors import EncodeError, UnroutableError
from meshlink.outbox import MemoryOutboxStore, Outbox, Relay
from meshlink.outbox.contract import NOW, entry
from meshlink.outbox.store import OutboxEntry, RowFailure
from meshlink.resilience.defaults import Policies

from .helpers import ScriptedTransport


async def _add(store: MemoryOutboxStore, entries: Sequence[OutboxEntry]) -> None:
    async with store.transaction() as tx:
        await store.add(tx, entries)


def _bodies(rows: Sequence[object]) -> list[int]:
    return [int(r.body) for r in rows]  # type: ignore[attr-defined]


# -- 1. memory claim hands out a key's later row that is leased to another live relay ----------


async def test_memory_claim_never_hands_out_a_row_leased_to_another_live_relay() -> None:
    """Relay a holds x1 (batch N) and, claimed 5 s later while N was in flight, x2 (batch N+1,
    ``exclude=[x1]``). x1's lease lapses first; relay b takes x1 over, which is fine (a
    duplicate), but x2 is still under a's live lease: a is publishing it. The SQL store leaves
    x2 alone (each row must itself be free); the memory store gives it to b as well, so two
    live relays publish x2 at the same time (and b may publish it before a is done)."""
    store = MemoryOutboxStore()
    await _add(store, [entry(1, "x"), entry(2, "x")])
    n = await store.claim("a", limit=1, lease=30, now=NOW)
    assert _bodies(n) == [1]
    following = await store.claim("a", limit=10, lease=30, now=NOW + 5, exclude=[r.id for r in n])
    assert _bodies(following) == [2]  # leased to a until NOW + 35
    taken = await store.claim("b", limit=10, lease=30, now=NOW + 31)
    assert _bodies(taken) == [1]  # fails: [1, 2] -- x2 is leased to a (live) and to b


async def test_a_second_relay_does_not_publish_a_row_another_live_relay_is_publishing(
    fake_clock: FakeClock,
) -> None:
    """The same through a Relay: b publishes x2 while a still holds its live lease on it."""
    store = MemoryOutboxStore()
    outbox = Outbox(store, clock=fake_clock)
    async with store.transaction() as tx:
        await outbox.publish(tx, "orders", {"n": 1}, key="x")
        await outbox.publish(tx, "orders", {"n": 2}, key="x")
    t0 = fake_clock.time()
    n = await store.claim("a", limit=1, lease=30, now=t0)  # relay a's batch N, in flight
    await store.claim("a", limit=10, lease=30, now=t0 + 5, exclude=[r.id for r in n])  # its batch N+1
    await fake_clock.advance(31)  # a's lease on x1 lapsed; on x2 it runs until t0 + 35
    transport = ScriptedTransport()
    await Relay(store, transport, clock=fake_clock, name="b").run_once()
    published = [json.loads(m.body)["n"] for m in transport.published]
    assert 2 not in published  # fails: b published x2, which a holds (live lease) and publishes too


# -- 2. memory claim hands out a key's later row that is waiting for its retry -----------------


async def test_memory_claim_never_hands_out_a_row_waiting_for_its_retry() -> None:
    """x1 is still a's (its mark_sent did not land), x2 failed and waits until NOW + 100.
    SQL: x2 is not free (``retry_at > now``), so a gets x1 only. Memory: the key is held
    through its head, and every later row of it is handed out whatever its retry_at."""
    store = MemoryOutboxStore()
    await _add(store, [entry(1, "x"), entry(2, "x")])
    rows = await store.claim("a", limit=10, lease=30, now=NOW)
    failure = RowFailure(id=rows[1].id, reason="Refused: no", retry_at=NOW + 100)
    assert await store.record_failure("a", [failure], now=NOW, max_attempts=5) == []
    again = await store.claim("a", limit=10, lease=30, now=NOW + 1)
    assert _bodies(again) == [1]  # fails: [1, 2] -- x2 claimed 99 s before its retry_at


async def test_the_relay_does_not_retry_a_failed_row_before_its_retry_at(fake_clock: FakeClock) -> None:
    """One batch: x1 confirmed, x2 refused (attempt recorded, retry in 60 s), but marking x1
    sent hit a store error. The very next claim brings x1 back (a duplicate: fine) *and* x2,
    which is published again at once, ignoring its backoff."""

    class MarkFailsOnce(MemoryOutboxStore):
        failed = False

        async def mark_sent(self, relay: str, ids: Sequence[int], *, now: float) -> int:
            if not self.failed:
                self.failed = True
                raise ConnectionError("store hiccup")
            return await super().mark_sent(relay, ids, now=now)

    store = MarkFailsOnce()
    outbox = Outbox(store, clock=fake_clock)
    async with store.transaction() as tx:
        await outbox.publish(tx, "orders", {"n": 1}, key="x")
        await outbox.publish(tx, "nowhere", {"n": 2}, key="x")
    transport = ScriptedTransport()
    transport.fail = lambda o: UnroutableError("no route") if o.destination == "nowhere" else None
    relay = Relay(store, transport, clock=fake_clock, retry_backoff=60, max_attempts=5)
    await relay.run_once()
    await relay.run_once()  # same instant: x2's retry is 60 s away
    attempts_on_x2 = sum(1 for call in transport.calls for o in call if o.destination == "nowhere")
    assert attempts_on_x2 == 1  # fails: 2


# -- 3. the writer has no body limit (Mesh.message refuses bodies over max_body_bytes) ---------


async def test_the_outbox_writer_refuses_a_body_over_max_body_bytes_like_mesh_message() -> None:
    """Mesh.message raises EncodeError past ``defaults.max_body_bytes`` (16 MiB by default);
    Outbox.publish writes the row, and the oversized message only fails later, at the relay
    (or goes through on a broker with a higher limit, unlike the same publish on the mesh)."""
    store = MemoryOutboxStore()
    outbox = Outbox(store)
    too_big = b"x" * (Policies().max_body_bytes + 1)
    async with store.transaction() as tx:
        with pytest.raises(EncodeError):  # fails: DID NOT RAISE
            await outbox.publish(tx, "orders", too_big)
