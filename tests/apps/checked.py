"""Meshes for the `meshlink check` tests."""

from __future__ import annotations

from meshlink import Breaker, Idempotency, MemoryIdempotencyStore, Mesh, Retry

good = Mesh("memory://check", service="billing")


@good.handler("orders.placed", breaker=Breaker(name="payments"), retry=Retry(redeliver=("5s", "1m")))
async def charge(event: dict[str, str]) -> None:
    pass


contradictory = Mesh("memory://check2", service="billing")


@contradictory.handler(
    "orders.placed",
    retry=Retry(redeliver=("1h", "2h")),
    idempotency=Idempotency(store=MemoryIdempotencyStore(), ttl="30m"),
)
async def refund(event: dict[str, str]) -> None:
    pass
