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


rabbit = Mesh(
    "amqp://guest:guest@127.0.0.1:5672/", service="billing", transport_options={"queue_type": "quorum"}
)


@rabbit.handler("orders.placed", options={"delivery_limit": 5}, timeout="20m")
async def ship(event: dict[str, str]) -> None:
    pass


kafka = Mesh("kafka://127.0.0.1:9", service="billing")


@kafka.handler("orders.placed", timeout="4m", retry=Retry(attempts=2))
async def invoice(event: dict[str, str]) -> None:
    pass
