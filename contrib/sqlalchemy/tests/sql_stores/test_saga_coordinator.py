"""The saga coordinator on SQL: state and commands in one transaction, replicas, restarts."""

from __future__ import annotations

import asyncio
from collections import Counter

from pydantic import BaseModel

from meshlink import Context, Event, Mesh
from meshlink.outbox import Relay
from meshlink.saga import Command, Saga, SagaCoordinator, SagaStatus, SagaStepChanged
from meshlink.transport import MemoryTransport
from meshlink_sqlalchemy import SqlSagaInstanceStore, SqlStores


class Trip(BaseModel):
    trip_id: str
    price: int
    hotel: str | None = None


class BookHotel(BaseModel):
    trip_id: str


class CancelHotel(BaseModel):
    trip_id: str


class HotelBooked(BaseModel):
    ref: str


class Pay(BaseModel):
    trip_id: str
    price: int


class Paid(BaseModel):
    pass


class Refused(BaseModel):
    pass


def trip_saga() -> Saga[Trip]:
    saga: Saga[Trip] = Saga("trip", Trip)
    saga.remote(
        "hotel",
        send=lambda t: Command("hotel.book", BookHotel(trip_id=t.trip_id)),
        success=HotelBooked,
        on_success=lambda t, r: t.model_copy(update={"hotel": r.ref}),
        compensate=lambda t: Command("hotel.cancel", CancelHotel(trip_id=t.trip_id)),
    )
    saga.remote(
        "pay",
        send=lambda t: Command("bank.pay", Pay(trip_id=t.trip_id, price=t.price)),
        success=Paid,
        failure=Refused,
    )
    return saga


class Participants:
    """Hotel and bank services; they count what they did per trip."""

    def __init__(self, url: str) -> None:
        self.mesh = Mesh(url, service="partners")
        self.done: Counter[str] = Counter()
        self.changed = asyncio.Event()

        @self.mesh.handler("hotel.book")
        async def book(cmd: BookHotel, ctx: Context) -> None:
            self.done[f"book:{cmd.trip_id}"] += 1
            await ctx.reply(HotelBooked(ref=f"H-{cmd.trip_id}"))

        @self.mesh.handler("hotel.cancel")
        async def cancel(cmd: CancelHotel) -> None:
            self.done[f"cancel:{cmd.trip_id}"] += 1
            self.changed.set()

        @self.mesh.handler("bank.pay")
        async def pay(cmd: Pay, ctx: Context) -> None:
            self.done[f"pay:{cmd.trip_id}"] += 1
            await ctx.reply(Refused() if cmd.price > 100 else Paid())


def coordinator_mesh(url: str, stores: SqlStores) -> tuple[Mesh, SagaCoordinator]:
    mesh = Mesh(url, service="travel")
    coordinator = SagaCoordinator(mesh, [trip_saga()], store=SqlSagaInstanceStore(stores), poll=0.2)
    Relay(stores.outbox, poll_interval="50ms").attach(mesh)
    return mesh, coordinator


async def wait_finished(stores: SqlStores, ids: list[str], *meshes: Mesh) -> None:
    store = SqlSagaInstanceStore(stores)
    changed = asyncio.Event()

    def on_event(event: Event) -> None:
        if isinstance(event, SagaStepChanged):
            changed.set()

    for mesh in meshes:
        mesh.add_listener(on_event)
    async with asyncio.timeout(60):
        while True:
            changed.clear()  # before looking: a save during the loads must wake the wait below
            found = [await store.load(i) for i in ids]
            if all(f is not None and f.status.finished for f in found):
                return
            await changed.wait()


async def test_sagas_run_through_the_outbox_and_compensate(stores: SqlStores, memory_url: str) -> None:
    partners = Participants(memory_url)
    mesh, coordinator = coordinator_mesh(memory_url, stores)
    async with partners.mesh, mesh:
        ids = [
            await coordinator.start("trip", Trip(trip_id=f"t{i}", price=50 if i % 2 else 500))
            for i in range(10)
        ]
        await wait_finished(stores, ids, mesh)
        statuses = [(await coordinator.get(i)).status for i in ids]  # type: ignore[union-attr]
        async with asyncio.timeout(30):
            while sum(k.startswith("cancel:") for k in partners.done) < 5:
                partners.changed.clear()  # no await between the check and the clear: no lost wake-up
                await partners.changed.wait()
    assert statuses.count(SagaStatus.COMPLETED) == 5
    assert statuses.count(SagaStatus.COMPENSATED) == 5
    assert max(partners.done.values()) == 1, "no command was sent twice"
    assert await stores.outbox.list_pending() == [], "every command went out through the outbox"


async def test_two_coordinator_replicas_share_the_store(pg_stores: SqlStores, memory_url: str) -> None:
    """PostgreSQL only: SQLite runs one relay (and one coordinator) by design."""
    stores = pg_stores
    partners = Participants(memory_url)
    (m1, c1), (m2, _) = coordinator_mesh(memory_url, stores), coordinator_mesh(memory_url, stores)
    async with partners.mesh, m1, m2:
        ids = [await c1.start("trip", Trip(trip_id=f"r{i}", price=50)) for i in range(40)]
        await wait_finished(stores, ids, m1, m2)
    assert all(partners.done[f"pay:r{i}"] == 1 for i in range(40))
    assert max(partners.done.values()) == 1


async def test_a_restarted_coordinator_finishes_what_the_first_one_left(
    stores: SqlStores, memory_url: str
) -> None:
    # The broker outlives the services, as a real one does: a memory:// broker lives while one
    # of its transports is open, and without this one it (and the queued commands) could go
    # between the first coordinator's stop and the participants' start.
    broker = MemoryTransport(memory_url)
    await broker.connect()
    try:
        partners = Participants(memory_url)
        first, c1 = coordinator_mesh(memory_url, stores)
        async with first:
            async with partners.mesh:
                pass  # the participants' queues exist; the services themselves are down
            # so the sagas wait for the hotel's reply
            ids = [await c1.start("trip", Trip(trip_id=f"w{i}", price=50)) for i in range(5)]
            waiting = [await c1.get(i) for i in ids]
            assert all(w is not None and w.waiting for w in waiting)
        second, _ = coordinator_mesh(memory_url, stores)
        async with partners.mesh, second:
            await wait_finished(stores, ids, second)
    finally:
        await broker.close()
    assert all(partners.done[f"pay:w{i}"] == 1 for i in range(5))
