"""The outbox store contract as runnable checks: every store (ours and third parties') runs them.

Give each check a :class:`StoreHarness` over a fresh, empty store::

    @pytest.mark.parametrize("check", contract.CHECKS, ids=lambda c: c.__name__)
    async def test_contract(check, harness):
        await check(harness)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from meshlink.message import Message
from meshlink.outbox.relay import decode_row
from meshlink.outbox.store import OutboxEntry, OutboxStore, RowFailure

__all__ = ["CHECKS", "StoreHarness", "entry"]

NOW = 1_700_000_000.0


class StoreHarness(Protocol):
    """A fresh store, and a way to add rows in a transaction that commits or rolls back."""

    store: OutboxStore

    async def add(self, entries: Sequence[OutboxEntry], *, commit: bool = True) -> None: ...


def entry(n: int, key: str | None = None, *, destination: str = "orders") -> OutboxEntry:
    """An entry whose body is ``n`` (to check order and identity)."""
    return OutboxEntry(
        destination=destination,
        message=Message(body=str(n).encode(), key=key, type="T"),
        created_at=NOW + n / 1000,
    )


def _bodies(rows: Sequence[object]) -> list[int]:
    return [int(decode_row(r).body) for r in rows]  # type: ignore[arg-type]


async def rolled_back_rows_are_never_claimed(h: StoreHarness) -> None:
    await h.add([entry(1)], commit=False)
    await h.add([entry(2)])
    rows = await h.store.claim("a", limit=10, lease=30, now=NOW)
    assert _bodies(rows) == [2]


async def claim_is_in_id_order_and_leased_to_one_relay(h: StoreHarness) -> None:
    await h.add([entry(i, key=f"k{i % 3}") for i in range(6)] + [entry(6)])
    rows = await h.store.claim("a", limit=100, lease=30, now=NOW)
    assert _bodies(rows) == list(range(7))
    assert [r.id for r in rows] == sorted(r.id for r in rows)
    assert await h.store.claim("b", limit=100, lease=30, now=NOW) == []
    message = decode_row(rows[0])
    assert (message.type, message.key) == ("T", "k0")


async def a_key_is_never_split_between_relays(h: StoreHarness) -> None:
    await h.add([entry(1, "x"), entry(2, "y"), entry(3, "x"), entry(4, "y"), entry(5, "z")])
    first = await h.store.claim("a", limit=1, lease=30, now=NOW)
    assert _bodies(first) == [1]
    second = await h.store.claim("b", limit=100, lease=30, now=NOW)
    assert _bodies(second) == [2, 4, 5]  # never 3: key x's head is held by a
    await h.store.mark_sent("a", [r.id for r in first], now=NOW)
    third = await h.store.claim("b", limit=100, lease=30, now=NOW)
    assert _bodies(third) == [2, 3, 4, 5]  # its own rows again, and now key x


async def an_expired_lease_is_claimable_again(h: StoreHarness) -> None:
    await h.add([entry(1, "x"), entry(2, "x")])
    assert len(await h.store.claim("dead", limit=10, lease=30, now=NOW)) == 2
    assert await h.store.claim("b", limit=10, lease=30, now=NOW + 29) == []
    again = await h.store.claim("b", limit=10, lease=30, now=NOW + 31)
    assert _bodies(again) == [1, 2]
    assert await h.store.mark_sent("dead", [r.id for r in again], now=NOW) == 0  # no longer its rows


async def a_relay_reclaims_its_own_rows(h: StoreHarness) -> None:
    await h.add([entry(1, "x")])
    first = await h.store.claim("a", limit=10, lease=30, now=NOW)
    assert [r.id for r in await h.store.claim("a", limit=10, lease=30, now=NOW)] == [r.id for r in first]


async def a_claim_skips_the_excluded_rows_in_flight_and_brings_their_keys_later_rows(h: StoreHarness) -> None:
    await h.add([entry(1, "x"), entry(2, "y"), entry(3, "x"), entry(4), entry(5, "x")])
    in_flight = await h.store.claim("a", limit=2, lease=30, now=NOW)
    assert _bodies(in_flight) == [1, 2]
    ids = [r.id for r in in_flight]
    following = await h.store.claim("a", limit=10, lease=30, now=NOW, exclude=ids)
    assert _bodies(following) == [3, 4, 5]  # x's head is a's (in flight): its later rows come along
    assert (
        await h.store.claim("a", limit=10, lease=30, now=NOW, exclude=ids + [r.id for r in following]) == []
    )
    assert await h.store.claim("b", limit=10, lease=30, now=NOW) == []  # every key held by a
    assert (await h.store.stats(now=NOW)).in_flight == 5  # excluded rows keep their lease
    await h.store.mark_sent("a", ids, now=NOW)
    assert _bodies(await h.store.claim("a", limit=10, lease=30, now=NOW)) == [3, 4, 5]  # its own rows


async def a_failed_row_holds_back_its_key_until_retry(h: StoreHarness) -> None:
    await h.add([entry(1, "x"), entry(2, "x"), entry(3, "y")])
    rows = await h.store.claim("a", limit=10, lease=30, now=NOW)
    failure = RowFailure(id=rows[0].id, reason="Boom: no", retry_at=NOW + 10)
    assert await h.store.record_failure("a", [failure], now=NOW, max_attempts=3) == []
    await h.store.release("a", [rows[1].id])
    await h.store.mark_sent("a", [rows[2].id], now=NOW)
    assert await h.store.claim("b", limit=10, lease=30, now=NOW + 1) == []
    later = await h.store.claim("b", limit=10, lease=30, now=NOW + 10)
    assert _bodies(later) == [1, 2]
    assert later[0].attempts == 1
    stats = await h.store.stats(now=NOW + 10)
    assert (stats.pending, stats.in_flight, stats.sent) == (2, 2, 1)


async def a_row_out_of_budget_is_moved_aside_with_its_reason(h: StoreHarness) -> None:
    await h.add([entry(1, "x"), entry(2, "x")])
    for attempt in range(2):
        rows = await h.store.claim("a", limit=1, lease=30, now=NOW + attempt)
        failure = RowFailure(id=rows[0].id, reason=f"Refused: {attempt}", retry_at=NOW + attempt)
        moved = await h.store.record_failure("a", [failure], now=NOW + attempt, max_attempts=2)
    assert moved == [rows[0].id]
    failed = await h.store.list_failed()
    assert [(f.id, f.attempts, f.reason, f.key) for f in failed] == [(rows[0].id, 2, "Refused: 1", "x")]
    assert _bodies(await h.store.claim("a", limit=10, lease=30, now=NOW + 5)) == [2]  # key goes on
    assert (await h.store.stats(now=NOW)).failed == 1


async def a_permanent_failure_is_moved_aside_at_once(h: StoreHarness) -> None:
    await h.add([entry(1)])
    rows = await h.store.claim("a", limit=1, lease=30, now=NOW)
    failure = RowFailure(id=rows[0].id, reason="undecodable", retry_at=NOW, permanent=True)
    assert await h.store.record_failure("a", [failure], now=NOW, max_attempts=10) == [rows[0].id]


async def sent_rows_leave_lag_and_are_purged_after_retention(h: StoreHarness) -> None:
    await h.add([entry(1), entry(2)])
    assert (await h.store.stats(now=NOW + 7)).lag >= 6.9
    rows = await h.store.claim("a", limit=10, lease=30, now=NOW)
    assert await h.store.mark_sent("a", [r.id for r in rows], now=NOW + 1) == 2
    stats = await h.store.stats(now=NOW + 7)
    assert (stats.pending, stats.sent, stats.lag) == (0, 2, 0.0)
    assert await h.store.purge(sent_before=NOW + 1) == 0
    assert await h.store.purge(sent_before=NOW + 2) == 2
    assert (await h.store.stats(now=NOW)).sent == 0


async def released_rows_are_claimable_at_once_without_an_attempt(h: StoreHarness) -> None:
    await h.add([entry(1, "x")])
    rows = await h.store.claim("a", limit=10, lease=30, now=NOW)
    await h.store.release("a", [r.id for r in rows])
    again = await h.store.claim("b", limit=10, lease=30, now=NOW)
    assert [(r.id, r.attempts) for r in again] == [(rows[0].id, 0)]
    assert [r.id for r in await h.store.list_pending()] == [rows[0].id]


async def a_row_leased_to_another_live_relay_is_never_claimed(h: StoreHarness) -> None:
    await h.add([entry(1, "x"), entry(2, "x")])
    n = await h.store.claim("a", limit=1, lease=30, now=NOW)
    following = await h.store.claim("a", limit=10, lease=30, now=NOW + 5, exclude=[r.id for r in n])
    assert _bodies(following) == [2]  # leased to a until NOW + 35, in flight there
    # x1's lease lapsed: b takes it over (a duplicate at worst); x2 is still a's
    assert _bodies(await h.store.claim("b", limit=10, lease=30, now=NOW + 31)) == [1]


async def a_later_row_waiting_for_its_retry_is_not_claimed(h: StoreHarness) -> None:
    await h.add([entry(1, "x"), entry(2, "x")])
    rows = await h.store.claim("a", limit=10, lease=30, now=NOW)
    failure = RowFailure(id=rows[1].id, reason="Refused: no", retry_at=NOW + 100)
    assert await h.store.record_failure("a", [failure], now=NOW, max_attempts=5) == []
    assert _bodies(await h.store.claim("a", limit=10, lease=30, now=NOW + 1)) == [1]


CHECKS: list[Callable[[StoreHarness], Awaitable[None]]] = [
    rolled_back_rows_are_never_claimed,
    claim_is_in_id_order_and_leased_to_one_relay,
    a_key_is_never_split_between_relays,
    an_expired_lease_is_claimable_again,
    a_relay_reclaims_its_own_rows,
    a_claim_skips_the_excluded_rows_in_flight_and_brings_their_keys_later_rows,
    a_failed_row_holds_back_its_key_until_retry,
    a_row_out_of_budget_is_moved_aside_with_its_reason,
    a_permanent_failure_is_moved_aside_at_once,
    sent_rows_leave_lag_and_are_purged_after_retention,
    released_rows_are_claimable_at_once_without_an_attempt,
    a_row_leased_to_another_live_relay_is_never_claimed,
    a_later_row_waiting_for_its_retry_is_not_claimed,
]
"""Every check of the contract."""
