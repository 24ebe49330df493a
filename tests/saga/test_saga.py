"""Sagas: happy path, compensation, timeouts, late and duplicate replies, parking, resume."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from pydantic import BaseModel

from meshlink import ConfigurationError, Context, FakeClock, Mesh, Retry
from meshlink.saga import (
    Command,
    MemorySagaStore,
    Saga,
    SagaCoordinator,
    SagaInstance,
    SagaStatus,
    SagaStepChanged,
)


class Order(BaseModel):
    order_id: str
    amount: float
    reservation: str | None = None
    payment: str | None = None
    audit: list[str] = []


class Reserve(BaseModel):
    order_id: str


class Release(BaseModel):
    order_id: str


class Reserved(BaseModel):
    reservation: str


class OutOfStock(BaseModel):
    order_id: str


class Charge(BaseModel):
    order_id: str
    amount: float


class Charged(BaseModel):
    payment: str


class Declined(BaseModel):
    reason: str


def checkout(*, refund: Callable[[Order], object] | None = None, pay_timeout: str = "30s") -> Saga[Order]:
    async def note(state: Order) -> Order:
        return state.model_copy(update={"audit": [*state.audit, "noted"]})

    async def unnote(state: Order) -> Order:
        return state.model_copy(update={"audit": [*state.audit, "unnoted"]})

    saga: Saga[Order] = Saga("checkout", Order)
    saga.local("note", note, compensate=unnote, retry=Retry(attempts=2, backoff=0.01, redeliver=()))
    saga.remote(
        "reserve",
        send=lambda s: Command("inventory.reserve", Reserve(order_id=s.order_id), key=s.order_id),
        success=Reserved,
        on_success=lambda s, r: s.model_copy(update={"reservation": r.reservation}),
        failure=OutOfStock,
        compensate=refund or (lambda s: Command("inventory.release", Release(order_id=s.order_id))),
        retry=Retry(attempts=2, backoff=0.01, redeliver=()),
    )
    saga.remote(
        "pay",
        send=lambda s: Command("payments.charge", Charge(order_id=s.order_id, amount=s.amount)),
        success=Charged,
        on_success=lambda s, r: s.model_copy(update={"payment": r.payment}),
        failure=Declined,
        timeout=pay_timeout,
    )
    return saga


class World:
    """The coordinator's mesh and two participants on one memory broker."""

    def __init__(
        self, url: str, clock: FakeClock, saga: Saga[Order], *, store: MemorySagaStore | None = None
    ):
        self.clock = clock
        self.mesh = Mesh(url, service="orders", clock=clock)
        self.store = store or MemorySagaStore()
        self.coordinator = SagaCoordinator(self.mesh, [saga], store=self.store, poll=1)
        self.shop = Mesh(url, service="shop", clock=clock)
        self.released: list[str] = []
        self.pay_replies = 1
        self.pay_mode = "ok"
        self.charges: list[str] = []

        @self.shop.handler("inventory.reserve")
        async def reserve(cmd: Reserve, ctx: Context) -> None:
            if cmd.order_id.startswith("none"):
                await ctx.reply(OutOfStock(order_id=cmd.order_id))
            else:
                await ctx.reply(Reserved(reservation=f"r-{cmd.order_id}"))

        @self.shop.handler("inventory.release")
        async def release(cmd: Release) -> None:
            self.released.append(cmd.order_id)

        @self.shop.handler("payments.charge")
        async def charge(cmd: Charge, ctx: Context) -> None:
            self.charges.append(cmd.order_id)
            if self.pay_mode == "silent":
                return
            for _ in range(self.pay_replies):
                if self.pay_mode == "decline":
                    await ctx.reply(Declined(reason="card expired"))
                else:
                    await ctx.reply(Charged(payment=f"p-{cmd.order_id}"))

    async def __aenter__(self) -> World:
        await self.shop.start()
        await self.mesh.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.mesh.stop()
        await self.shop.stop()

    async def until(self, predicate: Callable[[], bool], *, step: float = 0.1) -> None:
        async with asyncio.timeout(10):
            while not predicate():
                for _ in range(30):
                    await asyncio.sleep(0)
                if not predicate():
                    await self.clock.advance(step)

    async def finished(self, saga_id: str) -> None:
        async def done() -> bool:
            inst = await self.store.load(saga_id)
            return inst is not None and inst.status.finished

        async with asyncio.timeout(10):
            while not await done():
                for _ in range(30):
                    await asyncio.sleep(0)
                await self.clock.advance(0.1)

    async def events(self, saga_id: str) -> list[tuple[str, str]]:
        inst = await self.store.load(saga_id)
        assert inst is not None
        return [(h.step, h.event) for h in inst.history]


async def test_happy_path_runs_every_step_and_completes(memory_url: str, fake_clock: FakeClock) -> None:
    async with World(memory_url, fake_clock, checkout()) as w:
        sid = await w.coordinator.start("checkout", Order(order_id="o1", amount=10))
        await w.finished(sid)
        inst = await w.store.load(sid)
        assert inst is not None
        assert inst.status is SagaStatus.COMPLETED
        assert inst.state["reservation"] == "r-o1"
        assert inst.state["payment"] == "p-o1"
        assert inst.state["audit"] == ["noted"]
        assert [e for e in await w.events(sid) if e[1] in ("succeeded", "completed")] == [
            ("note", "succeeded"),
            ("reserve", "succeeded"),
            ("pay", "succeeded"),
            ("", "completed"),
        ]
        assert w.released == []


async def test_a_failing_step_compensates_completed_steps_in_reverse(
    memory_url: str, fake_clock: FakeClock
) -> None:
    async with World(memory_url, fake_clock, checkout()) as w:
        w.pay_mode = "decline"
        sid = await w.coordinator.start("checkout", Order(order_id="o2", amount=10))
        await w.finished(sid)
        await w.until(lambda: w.released == ["o2"])
        inst = await w.store.load(sid)
        assert inst is not None
        assert inst.status is SagaStatus.COMPENSATED
        assert [e for e in await w.events(sid) if e[1] in ("failed", "compensated")] == [
            ("pay", "failed"),
            ("reserve", "compensated"),
            ("note", "compensated"),
        ]
        assert inst.state["audit"] == ["noted", "unnoted"]


async def test_a_step_timeout_compensates_and_a_late_reply_is_ignored_and_recorded(
    memory_url: str, fake_clock: FakeClock
) -> None:
    async with World(memory_url, fake_clock, checkout(pay_timeout="5s")) as w:
        w.pay_mode = "silent"
        sid = await w.coordinator.start("checkout", Order(order_id="o3", amount=10))
        await w.finished(sid)
        assert ("pay", "timed-out") in await w.events(sid)
        inst = await w.store.load(sid)
        assert inst is not None
        assert inst.status is SagaStatus.COMPENSATED

        # the payment service answers at last: recorded, nothing changes
        late = w.mesh.message(
            Charged(payment="p-late"),
            headers={"saga-id": sid, "saga-step": "pay", "saga-token": inst.token},
        )
        await w.mesh.publish("saga.checkout.replies", late)
        await w.until(lambda: len(w.store.instances[sid].history) > len(inst.history))
        after = await w.store.load(sid)
        assert after is not None
        assert after.status is SagaStatus.COMPENSATED
        assert after.history[-1].event == "ignored-reply"
        assert after.state == inst.state


async def test_a_compensation_that_keeps_failing_parks_the_saga(
    memory_url: str, fake_clock: FakeClock
) -> None:
    attempts = 0

    async def refund(state: Order) -> Order:
        nonlocal attempts
        attempts += 1
        raise RuntimeError("inventory API down")

    async with World(memory_url, fake_clock, checkout(refund=refund)) as w:
        w.pay_mode = "decline"
        sid = await w.coordinator.start("checkout", Order(order_id="o4", amount=10))
        await w.finished(sid)
        inst = await w.store.load(sid)
        assert inst is not None
        assert inst.status is SagaStatus.FAILED
        assert inst.history[-1].event == "compensation-failed"
        assert "inventory API down" in inst.history[-1].detail
        assert attempts == 2, "retried under its own policy, then parked (no endless loop)"
        assert inst.state["audit"] == ["noted"], "earlier steps are left for the operator"


async def test_duplicate_replies_do_not_advance_a_saga_twice(memory_url: str, fake_clock: FakeClock) -> None:
    async with World(memory_url, fake_clock, checkout()) as w:
        w.pay_replies = 3
        sid = await w.coordinator.start("checkout", Order(order_id="o5", amount=10))
        await w.finished(sid)
        await w.until(lambda: sum(h.event == "ignored-reply" for h in w.store.instances[sid].history) == 2)
        events = await w.events(sid)
        assert events.count(("pay", "succeeded")) == 1
        assert events.count(("", "completed")) == 1


async def test_an_out_of_stock_reply_compensates_only_what_completed(
    memory_url: str, fake_clock: FakeClock
) -> None:
    async with World(memory_url, fake_clock, checkout()) as w:
        sid = await w.coordinator.start("checkout", Order(order_id="none-1", amount=10))
        await w.finished(sid)
        events = await w.events(sid)
        assert ("reserve", "failed") in events
        assert ("reserve", "compensated") not in events
        assert ("note", "compensated") in events
        assert w.charges == []


async def test_starting_twice_with_one_id_starts_one_saga(memory_url: str, fake_clock: FakeClock) -> None:
    async with World(memory_url, fake_clock, checkout()) as w:
        a = await w.coordinator.start("checkout", Order(order_id="o6", amount=1), saga_id="fixed")
        b = await w.coordinator.start("checkout", Order(order_id="o6", amount=1), saga_id="fixed")
        await w.finished("fixed")
        assert a == b == "fixed"
        assert w.charges == ["o6"]


async def test_a_restarted_coordinator_resumes_and_re_arms_timeouts(
    memory_url: str, fake_clock: FakeClock
) -> None:
    store = MemorySagaStore()
    async with World(memory_url, fake_clock, checkout(pay_timeout="5s"), store=store) as w:
        w.pay_mode = "silent"
        sid = await w.coordinator.start("checkout", Order(order_id="o7", amount=10))
        await w.until(lambda: w.charges == ["o7"])
    # the coordinator is gone while the saga waits; a new one takes over the same store
    store.publish = None
    async with World(memory_url, fake_clock, checkout(pay_timeout="5s"), store=store) as w2:
        await w2.finished(sid)
        assert ("pay", "timed-out") in await w2.events(sid)
        await w2.until(lambda: w2.released == ["o7"])


def test_definitions_are_checked_when_declared() -> None:
    async def act(s: Order) -> Order:
        return s

    saga: Saga[Order] = Saga("s", Order)
    saga.local("a", act)
    with pytest.raises(ConfigurationError, match="declared twice"):
        saga.local("a", act)
    saga.local("b", act)
    with pytest.raises(ConfigurationError, match="no compensation"):
        saga.validate()
    with pytest.raises(ConfigurationError, match="not a model"):
        saga.remote("c", send=lambda s: Command("x", {}), success=dict)  # type: ignore[type-var]
    with pytest.raises(ConfigurationError, match="pydantic model"):
        Saga("t", dict)  # type: ignore[type-var]
    with pytest.raises(ConfigurationError, match="needs a destination") as info:
        Command("", {})
    assert info.value.setting == "destination"


def test_a_saga_renders_as_mermaid() -> None:
    text = checkout().mermaid()
    assert text.startswith("flowchart LR")
    assert 's1["reserve<br/><small>remote, 30s</small>"]' in text
    assert "s1c --> s0c" in text


async def test_a_saga_left_mid_transition_by_a_dead_replica_is_taken_over(
    memory_url: str, fake_clock: FakeClock
) -> None:
    async with World(memory_url, fake_clock, checkout()) as w:
        # a replica saved "reserve succeeded" and died before sending the payment command
        stranded = SagaInstance(
            saga_id="stranded",
            name="checkout",
            definition_version=1,
            status=SagaStatus.RUNNING,
            state=Order(order_id="o8", amount=10, reservation="r-o8").model_dump(mode="json"),
            step=2,
            completed=(0, 1),
            created_at=fake_clock.time(),
            updated_at=fake_clock.time(),
            wake_at=fake_clock.time() + w.coordinator.stalled_after,  # as the dead replica saved it
        )
        await w.store.save(stranded)
        await w.finished("stranded")  # the live coordinator's sweep notices it and moves it on
        assert w.charges == ["o8"]
        assert (await w.events("stranded"))[-1] == ("", "completed")


async def test_each_reply_moves_a_saga_in_one_save(memory_url: str, fake_clock: FakeClock) -> None:
    async with World(memory_url, fake_clock, checkout()) as w:
        sid = await w.coordinator.start("checkout", Order(order_id="o9", amount=10))
        await w.finished(sid)
        inst = await w.store.load(sid)
        assert inst is not None
        # started (saved before the local step runs); note succeeded + reserve sent;
        # reserve succeeded + pay sent; pay succeeded + completed
        assert inst.version == 4
        assert [e for _, e in await w.events(sid)] == [
            "started",
            "succeeded",
            "sent",
            "succeeded",
            "sent",
            "succeeded",
            "completed",
        ]


async def test_a_local_compensation_runs_only_once_the_decision_to_compensate_is_saved(
    memory_url: str, fake_clock: FakeClock
) -> None:
    seen: list[tuple[str, str]] = []
    store = MemorySagaStore()

    async def refund(state: Order) -> Order:
        saved = store.instances[f"saga-{state.order_id}"]
        seen.append((saved.status.value, saved.history[-1].event))
        return state

    async with World(memory_url, fake_clock, checkout(refund=refund), store=store) as w:
        w.pay_mode = "decline"
        sid = await w.coordinator.start("checkout", Order(order_id="o10", amount=10), saga_id="saga-o10")
        await w.finished(sid)
        assert seen == [("compensating", "failed")], "the refund saw the saved decision"
        inst = await w.store.load(sid)
        assert inst is not None
        assert inst.status is SagaStatus.COMPENSATED


async def test_two_replicas_on_one_store_advance_each_saga_once(
    memory_url: str, fake_clock: FakeClock
) -> None:
    store = MemorySagaStore()
    async with World(memory_url, fake_clock, checkout(), store=store) as w:
        # a second coordinator of the same service: replies are shared between the two, so
        # each one's remembered copies go stale and must be caught by the version check
        replica = Mesh(memory_url, service="orders", clock=fake_clock)
        SagaCoordinator(replica, [checkout()], store=store, poll=1)
        replica_saves: list[object] = []
        replica.add_listener(lambda e: replica_saves.append(e) if isinstance(e, SagaStepChanged) else None)
        async with replica:
            ids = [
                await w.coordinator.start("checkout", Order(order_id=f"r{i}", amount=1)) for i in range(20)
            ]
            for sid in ids:
                await w.finished(sid)
        assert replica_saves, "the replica moved some of the sagas"
        assert sorted(w.charges) == sorted(f"r{i}" for i in range(20)), "each payment sent once"
        for sid in ids:
            events = await w.events(sid)
            assert events.count(("pay", "succeeded")) == 1
            assert events[-1] == ("", "completed")
