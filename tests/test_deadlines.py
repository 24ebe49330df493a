"""DeadlineLedger: one limit for many entries, one timer, expiry in entry order."""

from __future__ import annotations

import asyncio

from meshlink.deadlines import DeadlineLedger


async def test_entries_expire_in_order_and_leave_reports_whether_they_had() -> None:
    loop = asyncio.get_running_loop()
    expired: list[str] = []
    all_expired = asyncio.Event()

    def on_expire(item: str) -> None:
        expired.append(item)
        if len(expired) == 2:
            all_expired.set()

    ledger: DeadlineLedger[str] = DeadlineLedger(loop, 0.01, on_expire)
    first = ledger.enter("first", loop)
    gone = ledger.enter("left in time", loop)
    last = ledger.enter("last", loop)
    assert len(ledger) == 3
    assert ledger.leave(gone) is False
    await all_expired.wait()
    assert expired == ["first", "last"]
    assert len(ledger) == 0
    assert ledger.leave(first) is True
    assert ledger.leave(last) is True
