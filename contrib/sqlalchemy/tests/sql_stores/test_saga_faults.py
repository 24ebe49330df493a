"""SQLite and PostgreSQL: a duplicate reply handled by another replica used to bump the version
of a saga mid-local-step, so that step's result was lost and it ran again.

The coordinators' time is a FakeClock; the relay (real clock) is woken by each commit.
Every wait is on a condition, bounded by a real-time guard.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from pydantic import BaseModel

from meshlink import Context, FakeClock, Mesh, Retry
from meshlink.outbox import Relay
from meshlink.saga import Command, Saga, SagaCoordinator, SagaStatus
from meshlink_sqlalchemy import SqlSagaInstanceStore, SqlStores


class Order(BaseModel):
    order_id: str
    charged: int = 0


class Reserve(BaseModel):
    order_id: str


class Release(BaseModel):
    order_id: str


class Reserved(BaseModel):
    reservation: str


class Pay(BaseModel):
    order_id: str


class Paid(BaseModel):
    payment: str


def reserve_charge_pay(charges: list[str], gate: asyncio.Event) -> Saga[Order]:
    async def charge(s: Order) -> Order:
        charges.append(s.order_id)
        await gate.wait()
        return s.model_copy(update={"charged": s.charged + 1})

    async def refund(s: Order) -> Order:
        return s

    saga: Saga[Order] = Saga("shop", Order)
    saga.remote(
        "reserve",
        send=lambda s: Command("inventory.reserve", Reserve(order_id=s.order_id)),
        success=Reserved,
        compensate=lambda s: Command("inventory.release", Release(order_id=s.order_id)),
    )
    saga.local("charge", charge, compensate=refund, retry=Retry(attempts=1, redeliver=()))
    saga.remote("pay", send=lambda s: Command("payments.pay", Pay(order_id=s.order_id)), success=Paid)
    return saga


async def until(clock: FakeClock, done: Callable[[], Awaitable[bool]], *, step: float = 0.5) -> None:
    async with asyncio.timeout(30):
        while not await done():
            await asyncio.sleep(0.01)  # let database and relay I/O run
            await clock.advance(step)


async def test_a_duplicate_reply_on_another_replica_does_not_rerun_a_local_step(
    stores: SqlStores, memory_url: str, fake_clock: FakeClock
) -> None:
    charges: list[str] = []
    gate = asyncio.Event()
    shop = Mesh(memory_url, service="shop")

    @shop.handler("inventory.reserve")
    async def reserve(cmd: Reserve, ctx: Context) -> None:
        await ctx.reply(Reserved(reservation=f"r-{cmd.order_id}"))

    @shop.handler("payments.pay")
    async def pay(cmd: Pay, ctx: Context) -> None:
        await ctx.reply(Paid(payment=f"p-{cmd.order_id}"))

    mesh_a = Mesh(memory_url, service="orders", clock=fake_clock)
    relay = Relay(stores.outbox, poll_interval="50ms").attach(mesh_a)
    a = SagaCoordinator(
        mesh_a,
        [reserve_charge_pay(charges, gate)],
        store=SqlSagaInstanceStore(stores, wake=relay.wake),
        poll=1,
    )
    mesh_b = Mesh(memory_url, service="orders", clock=fake_clock)  # replica B: handles one duplicate reply
    b = SagaCoordinator(
        mesh_b, [reserve_charge_pay(charges, gate)], store=SqlSagaInstanceStore(stores), poll=1
    )
    store = SqlSagaInstanceStore(stores)

    async def loaded() -> SagaStatus | None:
        inst = await store.load("s1")
        return None if inst is None else inst.status

    async with shop, mesh_a:
        await a.start("shop", Order(order_id="o1"), saga_id="s1")

        async def in_charge() -> bool:
            return charges == ["o1"]

        await until(fake_clock, in_charge, step=0.01)  # A is inside the local step
        inst = await store.load("s1")
        assert inst is not None
        duplicate = mesh_a.message(
            Reserved(reservation="r-o1"),
            headers={"saga-id": "s1", "saga-step": "reserve", "saga-token": inst.token},
        )
        await b._on_reply(duplicate)  # the broker redelivered the reserve reply, to replica B
        gate.set()

        async def finished() -> bool:
            status = await loaded()
            return status is not None and status.finished

        await until(fake_clock, finished)
        final = await store.load("s1")
        assert final is not None
        assert final.status is SagaStatus.COMPLETED
        assert charges == ["o1"], f"the local step ran {len(charges)} times"
        assert final.state["charged"] == 1
