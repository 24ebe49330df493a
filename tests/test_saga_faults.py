"""The saga coordinator under faults (each test failed before its fix).

Memory store and memory transport, time injected through FakeClock; every wait is on
a condition (bounded by a real-time guard), never a sleep.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from pydantic import BaseModel

from meshlink import Context, FakeClock, Mesh, Retry
from meshlink.saga import (
    Command,
    MemorySagaStore,
    Saga,
    SagaCoordinator,
    SagaInstance,
    SagaStatus,
)


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


class Declined(BaseModel):
    reason: str


class Shop:
    """Participants: inventory (always answers), payments (answers unless silent)."""

    def __init__(self, url: str, clock: FakeClock) -> None:
        self.mesh = Mesh(url, service="shop", clock=clock)
        self.released: list[str] = []
        self.pays: list[str] = []
        self.pay_silent = False

        @self.mesh.handler("inventory.reserve")
        async def reserve(cmd: Reserve, ctx: Context) -> None:
            await ctx.reply(Reserved(reservation=f"r-{cmd.order_id}"))

        @self.mesh.handler("inventory.release")
        async def release(cmd: Release) -> None:
            self.released.append(cmd.order_id)

        @self.mesh.handler("payments.pay")
        async def pay(cmd: Pay, ctx: Context) -> None:
            self.pays.append(cmd.order_id)
            if not self.pay_silent:
                await ctx.reply(Paid(payment=f"p-{cmd.order_id}"))


def reserve_then_pay(*, bad_send: bool = False, name: str = "shop", version: int = 1) -> Saga[Order]:
    def pay_command(s: Order) -> Command:
        if bad_send and s.order_id.startswith("bad"):
            raise ValueError(f"cannot build the payment command for {s.order_id}")
        return Command("payments.pay", Pay(order_id=s.order_id))

    saga: Saga[Order] = Saga(name, Order, version=version)
    saga.remote(
        "reserve",
        send=lambda s: Command("inventory.reserve", Reserve(order_id=s.order_id)),
        success=Reserved,
        compensate=lambda s: Command("inventory.release", Release(order_id=s.order_id)),
    )
    saga.remote("pay", send=pay_command, success=Paid, failure=Declined, timeout="5s")
    return saga


async def settle(
    clock: FakeClock, predicate: Callable[[], bool], *, seconds: float, step: float = 0.5
) -> None:
    """Advance the fake clock in steps (letting tasks run between) until ``predicate`` or ``seconds``."""
    async with asyncio.timeout(20):
        moved = 0.0
        while not predicate() and moved < seconds:
            for _ in range(50):
                await asyncio.sleep(0)
            if predicate():
                return
            await clock.advance(step)
            moved += step
        for _ in range(50):
            await asyncio.sleep(0)


async def until(predicate: Callable[[], bool]) -> None:
    """Wait (no clock movement) until ``predicate`` holds."""
    async with asyncio.timeout(10):
        while not predicate():  # noqa: ASYNC110 - yield to tasks, no clock movement
            await asyncio.sleep(0)


def finished(store: MemorySagaStore, sid: str) -> bool:
    inst = store.instances.get(sid)
    return inst is not None and inst.status.finished


def events(store: MemorySagaStore, sid: str) -> list[tuple[str, str]]:
    return [(h.step, h.event) for h in store.instances[sid].history]


def stranded(clock: FakeClock, saga_id: str, order_id: str, *, wake_in: float) -> SagaInstance:
    """What a dead replica left: 'reserve succeeded' saved, the payment command not yet built."""
    return SagaInstance(
        saga_id=saga_id,
        name="shop",
        definition_version=1,
        status=SagaStatus.RUNNING,
        state=Order(order_id=order_id).model_dump(mode="json"),
        step=1,
        completed=(0,),
        created_at=clock.time(),
        updated_at=clock.time(),
        wake_at=clock.time() + wake_in,
    )


# -- 1. one saga whose move raises aborts every sweep: nobody else's timeout ever fires ------------


async def test_one_saga_that_fails_to_move_does_not_stop_other_sagas_timing_out(
    memory_url: str, fake_clock: FakeClock
) -> None:
    shop = Shop(memory_url, fake_clock)
    shop.pay_silent = True
    mesh = Mesh(memory_url, service="orders", clock=fake_clock)
    store = MemorySagaStore()
    coordinator = SagaCoordinator(mesh, [reserve_then_pay(bad_send=True)], store=store, poll=1)
    async with shop.mesh, mesh:
        good = await coordinator.start("shop", Order(order_id="good"))
        await settle(fake_clock, lambda: shop.pays == ["good"], seconds=2)
        assert store.instances[good].waiting
        # another saga, left mid-transition by a dead replica, whose payment command cannot be built
        await store.save(stranded(fake_clock, "bad-1", "bad-1", wake_in=1))
        # the good saga's payment never answers: after 5 s it must time out and compensate
        await settle(fake_clock, lambda: finished(store, good), seconds=60)
        assert ("pay", "timed-out") in events(store, good), "the timeout never fired"
        assert store.instances[good].status is SagaStatus.COMPENSATED


async def test_a_saga_that_fails_to_move_does_not_stop_the_coordinator_starting(
    memory_url: str, fake_clock: FakeClock
) -> None:
    store = MemorySagaStore()
    shop = Shop(memory_url, fake_clock)
    shop.pay_silent = True
    first = Mesh(memory_url, service="orders", clock=fake_clock)
    c1 = SagaCoordinator(first, [reserve_then_pay(bad_send=True)], store=store, poll=1)
    async with shop.mesh:
        async with first:
            good = await c1.start("shop", Order(order_id="good"))
            await settle(fake_clock, lambda: shop.pays == ["good"], seconds=2)
        await store.save(stranded(fake_clock, "bad-1", "bad-1", wake_in=1))
        await fake_clock.advance(30)  # both are overdue while no coordinator runs
        store.publish = None
        second = Mesh(memory_url, service="orders", clock=fake_clock)
        SagaCoordinator(second, [reserve_then_pay(bad_send=True)], store=store, poll=1)
        try:
            await second.start()  # raises here on the reviewed code: the resume sweep hits bad-1
            await settle(fake_clock, lambda: finished(store, good), seconds=10)
            assert ("pay", "timed-out") in events(store, good)
        finally:
            await second.stop()


# -- 2. a slow or hung local step blocks the sweep of every saga ---------------------------------


def gated_saga(gate: asyncio.Event, runs: list[str]) -> Saga[Order]:
    async def hold(s: Order) -> Order:
        runs.append(s.order_id)
        if s.order_id.startswith("slow"):
            await gate.wait()
        return s.model_copy(update={"charged": s.charged + 1})

    async def unhold(s: Order) -> Order:
        return s

    saga: Saga[Order] = Saga("shop", Order)
    saga.local("charge", hold, compensate=unhold, retry=Retry(attempts=1, redeliver=()))
    saga.remote(
        "pay", send=lambda s: Command("payments.pay", Pay(order_id=s.order_id)), success=Paid, timeout="5s"
    )
    return saga


async def test_a_long_local_step_does_not_freeze_other_sagas_timeouts(
    memory_url: str, fake_clock: FakeClock
) -> None:
    gate = asyncio.Event()
    runs: list[str] = []
    shop = Shop(memory_url, fake_clock)
    shop.pay_silent = True
    mesh = Mesh(memory_url, service="orders", clock=fake_clock)
    store = MemorySagaStore()
    coordinator = SagaCoordinator(mesh, [gated_saga(gate, runs)], store=store, poll=1)  # stalled after 20 s
    async with shop.mesh, mesh:
        slow = asyncio.create_task(coordinator.start("shop", Order(order_id="slow"), saga_id="slow"))
        await until(lambda: runs == ["slow"])
        await settle(fake_clock, lambda: False, seconds=18)
        quick = await coordinator.start("shop", Order(order_id="quick"), saga_id="quick")
        await settle(fake_clock, lambda: "quick" in shop.pays, seconds=1)
        # quick's payment times out 5 s later; the slow saga's local step is still running
        try:
            await settle(fake_clock, lambda: finished(store, quick), seconds=30)
            assert ("pay", "timed-out") in events(store, quick), "the sweep is stuck on the slow saga's lock"
        finally:
            gate.set()
            await slow


# -- 3. a duplicate reply handled by another replica makes a local step run twice ----------------


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


async def test_a_duplicate_reply_on_another_replica_does_not_rerun_a_local_step(
    memory_url: str, fake_clock: FakeClock
) -> None:
    charges: list[str] = []
    gate = asyncio.Event()
    store = MemorySagaStore()
    shop = Shop(memory_url, fake_clock)
    mesh_a = Mesh(memory_url, service="orders", clock=fake_clock)
    a = SagaCoordinator(mesh_a, [reserve_charge_pay(charges, gate)], store=store, poll=1)
    # replica B of the same service: it only handles one (duplicate) reply here
    mesh_b = Mesh(memory_url, service="orders", clock=fake_clock)
    b = SagaCoordinator(mesh_b, [reserve_charge_pay(charges, gate)], store=store, poll=1)
    async with shop.mesh, mesh_a:
        sid = await a.start("shop", Order(order_id="o1"), saga_id="s1")
        await settle(fake_clock, lambda: charges == ["o1"], seconds=2)  # A is inside the local step
        token = store.instances[sid].token
        duplicate = mesh_a.message(
            Reserved(reservation="r-o1"),
            headers={"saga-id": sid, "saga-step": "reserve", "saga-token": token},
        )
        await b._on_reply(duplicate)  # the broker redelivered the reserve reply, to replica B
        gate.set()
        await settle(fake_clock, lambda: finished(store, sid), seconds=60)
        assert store.instances[sid].status is SagaStatus.COMPLETED
        assert charges == ["o1"], f"the local step ran {len(charges)} times"
        assert store.instances[sid].state["charged"] == 1


# -- 4. a replica restarting while another runs a local step runs it too -------------------------


async def test_a_replica_starting_does_not_run_a_local_step_another_replica_is_running(
    memory_url: str, fake_clock: FakeClock
) -> None:
    charges: list[str] = []
    gate = asyncio.Event()
    store = MemorySagaStore()
    shop = Shop(memory_url, fake_clock)
    mesh_a = Mesh(memory_url, service="orders", clock=fake_clock)
    a = SagaCoordinator(mesh_a, [reserve_charge_pay(charges, gate)], store=store, poll=1)
    mesh_b = Mesh(memory_url, service="orders", clock=fake_clock)
    SagaCoordinator(mesh_b, [reserve_charge_pay(charges, gate)], store=store, poll=1)
    async with shop.mesh, mesh_a:
        sid = await a.start("shop", Order(order_id="o1"), saga_id="s1")
        await settle(fake_clock, lambda: charges == ["o1"], seconds=2)  # A is inside the local step
        starting = asyncio.create_task(mesh_b.start())  # replica B (re)starts meanwhile
        try:
            await until(lambda: starting.done() or len(charges) > 1)
            assert charges == ["o1"], "replica B ran the local step A is running"
        finally:
            gate.set()
            await settle(fake_clock, lambda: finished(store, sid), seconds=60)
            await starting
            await mesh_b.stop()


# -- 5. an instance of an older definition version is driven through the new definition's steps --


def screened_v2() -> Saga[Order]:
    async def screen(s: Order) -> Order:
        return s

    saga: Saga[Order] = Saga("shop", Order, version=2)
    saga.local("screen", screen, side_effects=False)
    v1 = reserve_then_pay()
    for step in v1.steps:
        saga._add(step)
    return saga


async def test_an_instance_of_an_older_version_is_not_run_against_the_new_definition(
    memory_url: str, fake_clock: FakeClock
) -> None:
    store = MemorySagaStore()
    shop = Shop(memory_url, fake_clock)
    shop.pay_silent = True
    old = Mesh(memory_url, service="orders", clock=fake_clock)
    v1 = SagaCoordinator(old, [reserve_then_pay()], store=store, poll=1)
    async with shop.mesh:
        async with old:
            sid = await v1.start("shop", Order(order_id="o1"), saga_id="s1")
            await settle(fake_clock, lambda: shop.pays == ["o1"], seconds=2)
        waiting = store.instances[sid]
        assert (waiting.definition_version, waiting.step, waiting.waiting) == (1, 1, True)
        # v2 (a new first step) is deployed while the v1 saga waits for its payment reply
        store.publish = None
        new = Mesh(memory_url, service="orders", clock=fake_clock)
        SagaCoordinator(new, [screened_v2()], store=store, poll=1)
        async with new:
            paid = new.message(
                Paid(payment="p-o1"),
                headers={"saga-id": sid, "saga-step": "pay", "saga-token": waiting.token},
            )
            await new.publish("saga.shop.replies", paid)
            await settle(fake_clock, lambda: finished(store, sid), seconds=30)
            await settle(fake_clock, lambda: False, seconds=1)
        inst = store.instances[sid]
        history = events(store, sid)
        assert ("reserve", "timed-out") not in history, f"a step that had succeeded timed out: {history}"
        assert not (inst.status is SagaStatus.COMPENSATED and shop.released == []), (
            "reported compensated, but the reservation was never released"
        )


# -- 6. a reply checked against a stale cached copy ---------------------------------------------


async def test_a_reply_is_checked_against_the_stored_saga_when_the_cached_copy_is_mid_transition(
    memory_url: str, fake_clock: FakeClock
) -> None:
    """A coordinator remembers the last copy it saved. Another replica may have moved the saga
    on since (it took over a step this one left): a genuine reply must then be checked against
    the stored saga, not ignored because the remembered copy is mid-transition."""
    store = MemorySagaStore()
    shop = Shop(memory_url, fake_clock)
    shop.pay_silent = True
    mesh = Mesh(memory_url, service="orders", clock=fake_clock)
    a = SagaCoordinator(mesh, [reserve_then_pay()], store=store, poll=1)
    async with shop.mesh, mesh:
        sid = await a.start("shop", Order(order_id="o1"), saga_id="s1")
        await settle(fake_clock, lambda: shop.pays == ["o1"], seconds=2)  # waiting for the payment
        stored = store.instances[sid]
        assert stored.waiting
        a._known[sid] = stored.evolve(waiting=False, due_at=None)  # what A remembers: older
        paid = mesh.message(
            Paid(payment="p-o1"), headers={"saga-id": sid, "saga-step": "pay", "saga-token": stored.token}
        )
        await a._on_reply(paid)
        assert store.instances[sid].status is SagaStatus.COMPLETED, events(store, sid)
