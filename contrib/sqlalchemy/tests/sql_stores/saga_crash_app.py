"""The services of the saga crash test: a trip saga, its coordinator, and two participants.

The coordinator runs as a child process (``python saga_crash_app.py STORE BROKER NS N``)
that starts sagas ``0..N-1`` (idempotently, by id) and prints ``SAVED`` after every
saga save, so the test can kill it with SIGKILL at chosen points of progress and
start it again. Participants run in the test process; each applies its side effect
through the SQL unit of work (inbox + effect row + reply in one transaction).
"""

from __future__ import annotations

import asyncio
import sys

from pydantic import BaseModel
from sqlalchemy import Column, Integer, MetaData, String, Table, UniqueConstraint

from meshlink import Context, Event, Mesh
from meshlink.logs import configure
from meshlink.outbox import Relay
from meshlink.saga import Command, Saga, SagaCoordinator, SagaStepChanged
from meshlink_sqlalchemy import SqlSagaInstanceStore, SqlStores, UnitOfWork


class Trip(BaseModel):
    trip_id: str
    price: int


class Book(BaseModel):
    trip_id: str


class Cancel(BaseModel):
    trip_id: str


class Booked(BaseModel):
    pass


class Pay(BaseModel):
    trip_id: str
    price: int


class Paid(BaseModel):
    pass


class Refused(BaseModel):
    pass


def trip_saga(ns: str) -> Saga[Trip]:
    saga: Saga[Trip] = Saga(f"trip{ns}", Trip)
    saga.remote(
        "book",
        send=lambda t: Command(f"{ns}.hotel.book", Book(trip_id=t.trip_id), key=t.trip_id),
        success=Booked,
        compensate=lambda t: Command(f"{ns}.hotel.cancel", Cancel(trip_id=t.trip_id), key=t.trip_id),
        timeout="60s",
    )
    saga.remote(
        "pay",
        send=lambda t: Command(f"{ns}.bank.pay", Pay(trip_id=t.trip_id, price=t.price), key=t.trip_id),
        success=Paid,
        failure=Refused,
        timeout="60s",
    )
    return saga


def price_of(i: int) -> int:
    return 500 if i % 4 == 0 else 50  # one trip in four is refused and compensates


def effects_table(ns: str) -> Table:
    return Table(
        f"{ns}_effects",
        MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("trip_id", String(64), nullable=False),
        Column("action", String(16), nullable=False),
        UniqueConstraint("trip_id", "action", name=f"{ns}_one_effect"),  # a second one fails loudly
    )


def participants(url: str, stores: SqlStores, ns: str, effects: Table) -> Mesh:
    mesh = Mesh(url, service=f"partners{ns}")
    uow = UnitOfWork(stores, source="partners")

    async def apply(ctx: Context, trip_id: str, action: str) -> None:
        await ctx.session.execute(effects.insert().values(trip_id=trip_id, action=action))

    @mesh.handler(f"{ns}.hotel.book", unit_of_work=uow, idempotency=None)
    async def book(cmd: Book, ctx: Context) -> None:
        await apply(ctx, cmd.trip_id, "book")
        await ctx.reply(Booked())

    @mesh.handler(f"{ns}.hotel.cancel", unit_of_work=uow, idempotency=None)
    async def cancel(cmd: Cancel, ctx: Context) -> None:
        await apply(ctx, cmd.trip_id, "cancel")

    @mesh.handler(f"{ns}.bank.pay", unit_of_work=uow, idempotency=None)
    async def pay(cmd: Pay, ctx: Context) -> None:
        if cmd.price > 100:
            await ctx.reply(Refused())
        else:
            await apply(ctx, cmd.trip_id, "pay")
            await ctx.reply(Paid())

    Relay(stores.outbox, poll_interval="100ms").attach(mesh)
    return mesh


async def coordinate(store_url: str, broker_url: str, ns: str, n: int) -> None:
    configure("ERROR")
    stores = SqlStores(store_url)
    mesh = Mesh(broker_url, service=f"travel{ns}")
    coordinator = SagaCoordinator(mesh, [trip_saga(ns)], store=SqlSagaInstanceStore(stores), poll=1)
    Relay(stores.outbox, poll_interval="100ms", lease="3s").attach(mesh)

    def on_event(event: Event) -> None:
        if isinstance(event, SagaStepChanged):
            print("SAVED", flush=True)

    mesh.add_listener(on_event)
    await mesh.start()
    print("STARTED", flush=True)
    for i in range(n):
        await coordinator.start(f"trip{ns}", Trip(trip_id=f"t{i}", price=price_of(i)), saga_id=f"{ns}-{i}")
    print("ALL-STARTED", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(coordinate(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
