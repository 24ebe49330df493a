"""An order-checkout saga across three small services: inventory, payment, shipping.

The orders service coordinates; each participant is its own Mesh (its own
service) and only answers commands with `ctx.reply(...)`. Payment declines
orders over 100, so those sagas compensate: the stock reservation is released.

Runs on memory:// with the saga state in SQLite by default. The coordinator writes each
saga's state and the commands it sends in one SQLite transaction (the outbox); a relay
in the orders service publishes them. Set MESHLINK_URL (a broker) and MESHLINK_SAGA_STORE
(e.g. postgresql+asyncpg://postgres@127.0.0.1/test) to run the same services elsewhere.
"""

from __future__ import annotations

import asyncio
import os
import tempfile

from pydantic import BaseModel

from meshlink import Context, Mesh
from meshlink.logs import configure
from meshlink.outbox import Relay
from meshlink.saga import Command, Saga, SagaCoordinator, SagaInstance, SagaStatus, SagaStepChanged
from meshlink_sqlalchemy import SqlSagaInstanceStore, SqlStores

URL = os.environ.get("MESHLINK_URL", "memory://checkout")
STORE = os.environ.get(
    "MESHLINK_SAGA_STORE", f"sqlite+aiosqlite:///{tempfile.gettempdir()}/meshlink-checkout-{os.getpid()}.db"
)


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

stores = SqlStores(STORE)
orders = Mesh(URL, service="orders")
relay = Relay(stores.outbox).attach(orders)  # publishes what the coordinator wrote
# the store wakes the relay after each commit that wrote commands (no waiting for its poll)
coordinator = SagaCoordinator(orders, [checkout], store=SqlSagaInstanceStore(stores, wake=relay.wake))

inventory = Mesh(URL, service="inventory")
payment = Mesh(URL, service="payment")
shipping = Mesh(URL, service="shipping")


@inventory.handler("inventory.reserve")
async def reserve(cmd: ReserveStock, ctx: Context) -> None:
    print(f"  inventory  reserved stock for {cmd.order_id}")
    await ctx.reply(StockReserved(reservation=f"R-{cmd.order_id}"))


released: list[str] = []
progress = asyncio.Event()  # set whenever a saga is saved or stock is released


@inventory.handler("inventory.release")
async def release(cmd: ReleaseStock) -> None:
    print(f"  inventory  released stock for {cmd.order_id} (compensation)")
    released.append(cmd.order_id)
    progress.set()


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
    orders.add_listener(lambda e: progress.set() if isinstance(e, SagaStepChanged) else None)
    await stores.init()
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
                progress.clear()  # before looking, so a change while we look still wakes us
                sagas = await instances(ids)
                compensated = sum(i.status is SagaStatus.COMPENSATED for i in sagas)
                if all(i.status.finished for i in sagas) and len(released) == compensated:
                    break  # every saga is done and every compensation has reached inventory
                await progress.wait()
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
        await stores.close()


async def instances(ids: dict[str, str]) -> list[SagaInstance]:
    found = [await coordinator.get(saga_id) for saga_id in ids.values()]
    return [i for i in found if i is not None]


if __name__ == "__main__":
    asyncio.run(main())
