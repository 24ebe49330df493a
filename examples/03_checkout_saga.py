"""An order-checkout saga across three small services: inventory, payment, shipping.

The orders service coordinates; each participant is its own Mesh (its own
service) and only answers commands with `ctx.reply(...)`. Payment declines
orders over 100, so those sagas compensate: the stock reservation is released.

Runs on memory:// by default; set MESHLINK_URL to run the same services on a broker.
"""

from __future__ import annotations

import asyncio
import os

from pydantic import BaseModel

from meshlink import Context, Mesh
from meshlink.logs import configure
from meshlink.saga import Command, Saga, SagaCoordinator, SagaInstance, SagaStatus, SagaStepChanged

URL = os.environ.get("MESHLINK_URL", "memory://checkout")


# -- messages ---------------------------------------------------------------------------------


class Order(BaseModel):
    order_id: str
    amount: float
    reservation: str | None = None
    payment: str | None = None
    tracking: str | None = None


class ReserveStock(BaseModel):
    order_id: str


class ReleaseStock(BaseModel):
    order_id: str


class StockReserved(BaseModel):
    reservation: str


class ChargeCard(BaseModel):
    order_id: str
    amount: float


class RefundCard(BaseModel):
    order_id: str


class CardCharged(BaseModel):
    payment: str


class CardDeclined(BaseModel):
    reason: str


class ScheduleShipment(BaseModel):
    order_id: str


class ShipmentScheduled(BaseModel):
    tracking: str


# -- the saga ---------------------------------------------------------------------------------

checkout: Saga[Order] = Saga("checkout", Order)
checkout.remote(
    "reserve-stock",
    send=lambda o: Command("inventory.reserve", ReserveStock(order_id=o.order_id), key=o.order_id),
    success=StockReserved,
    on_success=lambda o, r: o.model_copy(update={"reservation": r.reservation}),
    compensate=lambda o: Command("inventory.release", ReleaseStock(order_id=o.order_id), key=o.order_id),
    timeout="10s",
)
checkout.remote(
    "charge-card",
    send=lambda o: Command("payment.charge", ChargeCard(order_id=o.order_id, amount=o.amount)),
    success=CardCharged,
    failure=CardDeclined,
    on_success=lambda o, r: o.model_copy(update={"payment": r.payment}),
    compensate=lambda o: Command("payment.refund", RefundCard(order_id=o.order_id)),
    timeout="10s",
)
checkout.remote(
    "schedule-shipment",
    send=lambda o: Command("shipping.schedule", ScheduleShipment(order_id=o.order_id)),
    success=ShipmentScheduled,
    on_success=lambda o, r: o.model_copy(update={"tracking": r.tracking}),
    timeout="10s",
)

# -- the services -----------------------------------------------------------------------------

orders = Mesh(URL, service="orders")
coordinator = SagaCoordinator(orders, [checkout])

inventory = Mesh(URL, service="inventory")
payment = Mesh(URL, service="payment")
shipping = Mesh(URL, service="shipping")


@inventory.handler("inventory.reserve")
async def reserve(cmd: ReserveStock, ctx: Context) -> None:
    print(f"  inventory  reserved stock for {cmd.order_id}")
    await ctx.reply(StockReserved(reservation=f"R-{cmd.order_id}"))


@inventory.handler("inventory.release")
async def release(cmd: ReleaseStock) -> None:
    print(f"  inventory  released stock for {cmd.order_id} (compensation)")


@payment.handler("payment.charge")
async def charge(cmd: ChargeCard, ctx: Context) -> None:
    if cmd.amount > 100:
        print(f"  payment    declined {cmd.order_id} ({cmd.amount:.2f} is over the limit)")
        await ctx.reply(CardDeclined(reason="over the limit"))
    else:
        print(f"  payment    charged {cmd.amount:.2f} for {cmd.order_id}")
        await ctx.reply(CardCharged(payment=f"P-{cmd.order_id}"))


@payment.handler("payment.refund")
async def refund(cmd: RefundCard) -> None:
    print(f"  payment    refunded {cmd.order_id} (compensation)")


@shipping.handler("shipping.schedule")
async def schedule(cmd: ScheduleShipment, ctx: Context) -> None:
    print(f"  shipping   scheduled {cmd.order_id}")
    await ctx.reply(ShipmentScheduled(tracking=f"T-{cmd.order_id}"))


async def main() -> None:
    configure("CRITICAL")
    finished = asyncio.Event()
    orders.add_listener(lambda e: finished.set() if isinstance(e, SagaStepChanged) else None)
    services = [inventory, payment, shipping, orders]
    for mesh in services:
        await mesh.start()
    try:
        ids = {}
        for order_id, amount in [("A-1", 25.0), ("A-2", 250.0), ("A-3", 60.0)]:
            print(f"orders     start checkout for {order_id} ({amount:.2f})")
            ids[order_id] = await coordinator.start(checkout, Order(order_id=order_id, amount=amount))
        async with asyncio.timeout(30):
            while True:
                finished.clear()  # before looking, so a save while we look still wakes us
                if all(i.status.finished for i in await instances(ids)):
                    break
                await finished.wait()
        print()
        completed = 0
        for order_id, inst in zip(ids, await instances(ids), strict=True):
            steps = " -> ".join(f"{h.step}:{h.event}" for h in inst.history if h.step)
            print(f"{order_id}: {inst.status.value:<12} {steps}")
            completed += inst.status is SagaStatus.COMPLETED
        print(f"\n{completed} completed, {len(ids) - completed} compensated")
    finally:
        for mesh in reversed(services):
            await mesh.stop()


async def instances(ids: dict[str, str]) -> list[SagaInstance]:
    found = [await coordinator.get(saga_id) for saga_id in ids.values()]
    return [i for i in found if i is not None]


if __name__ == "__main__":
    asyncio.run(main())
