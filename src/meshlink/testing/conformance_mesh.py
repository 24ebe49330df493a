"""Conformance scenarios for a :class:`~meshlink.Mesh` running on the transport under test.

These prove that what the mesh promises above the contract — graceful shutdown,
the one attempt budget, redelivery, dead-letters with reasons, the breaker that
pauses consumption, the bulkhead, the timeout, idempotency and bad input — holds
on every broker, because it is written once against the contract.
"""

from __future__ import annotations

import asyncio

from meshlink.app import Mesh
from meshlink.context import Context
from meshlink.events import (
    BreakerStateChanged,
    Event,
    MessageDeadLettered,
    MessageHandled,
    RedeliveryScheduled,
    RetryScheduled,
)
from meshlink.message import Message
from meshlink.pipeline import Handler
from meshlink.resilience.breaker import Breaker
from meshlink.resilience.deadletter import (
    ERROR_MESSAGE,
    ERROR_TYPE,
    FAILED_ATTEMPTS,
    FIRST_FAILED_AT,
    HANDLER,
    LAST_FAILED_AT,
    ORIGINAL_DESTINATION,
)
from meshlink.resilience.idempotency import Idempotency, MemoryIdempotencyStore
from meshlink.resilience.policy import Retry
from meshlink.testing._conformance_base import ConformanceBase, Recorder, msg
from meshlink.transport.base import Outgoing

__all__ = ["MeshScenarios"]


class MeshScenarios(ConformanceBase):
    """A mesh on the transport under test."""

    async def test_graceful_shutdown_acks_what_finished_and_returns_the_rest(self) -> None:
        from meshlink.events import MeshDraining

        publisher = await self.connect()
        await publisher.declare(self.dest(), "svc")
        mesh = Mesh(self.make_transport(), service="svc", drain_timeout=2.0)
        started: list[str] = []
        finished: list[str] = []
        release = asyncio.Event()
        changed = asyncio.Condition()

        @mesh.handler(self.dest(), concurrency=4)
        async def work(message: Message) -> None:
            first = not started  # decided at the append: another handler may append meanwhile
            started.append(message.id)
            async with changed:
                changed.notify_all()
            if first:
                await asyncio.Event().wait()  # never finishes: cancelled at the drain deadline
            await release.wait()
            finished.append(message.id)

        draining = asyncio.Event()

        def on_event(event: Event) -> None:
            if isinstance(event, MeshDraining):
                draining.set()

        mesh.add_listener(on_event)
        await mesh.start()
        sent = [msg(i) for i in range(10)]
        await publisher.publish_many([Outgoing(destination=self.dest(), message=m) for m in sent])
        async with changed:
            await asyncio.wait_for(changed.wait_for(lambda: len(started) >= 4), self.timeout)
        stopping = asyncio.create_task(mesh.stop())
        await asyncio.wait_for(draining.wait(), self.timeout)
        release.set()
        await asyncio.wait_for(stopping, self.timeout)
        assert len(finished) == 3, "the three releasable handlers finish during the drain"

        second = await self.connect()
        rest = Recorder()
        await self.sub(second, self.dest(), "svc", rest)
        await rest.wait_count(len(sent) - len(finished), self.timeout)
        assert set(rest.ids).isdisjoint(finished), "a message that finished was delivered again"
        assert sorted(rest.ids + finished) == sorted(m.id for m in sent), "a message was lost"

    # -- retries, redelivery and the attempt budget ----------------------------------------

    def fast_retry(self, attempts: int = 2, redeliver: tuple[float, ...] = (0.2, 0.2)) -> Retry:
        return Retry(attempts=attempts, backoff=0.01, max_backoff=0.01, jitter=0, redeliver=redeliver)

    async def test_attempt_budget_spans_immediate_and_delayed_retries(self) -> None:
        mesh = self.new_mesh(service="budget")
        attempts: list[int] = []

        @mesh.handler(self.dest(), retry=self.fast_retry())
        async def always_fails(message: Message, ctx: Context) -> None:
            attempts.append(ctx.attempt)
            raise RuntimeError("dependency down")

        events: list[Event] = []
        mesh.add_listener(events.append)
        await mesh.start()
        parked = await self.dead_letters(mesh, "always_fails")
        sent = msg(1, key="k1")
        await (await self.connect()).publish(self.dest(), sent)
        await self.until(lambda: any(isinstance(e, MessageDeadLettered) for e in events))
        await parked.wait_count(1, self.timeout)

        assert attempts == [1, 2, 3, 4, 5, 6], "budget = 2 tries x (1 + 2 redeliveries)"
        assert sum(isinstance(e, RetryScheduled) for e in events) == 3
        assert sum(isinstance(e, RedeliveryScheduled) for e in events) == 2
        dead = parked.deliveries[0].message
        assert dead.id == sent.id
        assert dead.body == sent.body
        assert dead.key == sent.key
        assert dead.headers[ERROR_TYPE] == "builtins.RuntimeError"
        assert dead.headers[ERROR_MESSAGE] == "dependency down"
        assert dead.headers[HANDLER] == "always_fails"
        assert dead.headers[FAILED_ATTEMPTS] == "6"
        assert dead.headers[ORIGINAL_DESTINATION] == self.dest()
        assert dead.headers[FIRST_FAILED_AT] <= dead.headers[LAST_FAILED_AT]

    async def test_attempt_budget_holds_across_two_consumers(self) -> None:
        runs: list[int] = []
        meshes = [self.new_mesh(service="pair") for _ in range(2)]
        for mesh in meshes:

            @mesh.handler(self.dest(), retry=self.fast_retry(attempts=1, redeliver=(0.1, 0.1, 0.1)))
            async def fails(message: Message, ctx: Context) -> None:
                runs.append(ctx.attempt)
                raise RuntimeError("still down")

        dead: list[Event] = []
        for mesh in meshes:
            mesh.add_listener(lambda e: dead.append(e) if isinstance(e, MessageDeadLettered) else None)
            await mesh.start()
        await (await self.connect()).publish(self.dest(), msg(1))
        await self.until(lambda: len(dead) >= 1)
        assert sorted(runs) == [1, 2, 3, 4], "4 executions in all, whichever consumer ran them"
        assert len(dead) == 1

    async def test_redelivered_message_keeps_its_identity(self) -> None:
        mesh = self.new_mesh(service="ident")
        seen: list[Message] = []

        @mesh.handler(self.dest(), retry=self.fast_retry(attempts=1, redeliver=(0.1,)))
        async def flaky(message: Message) -> None:
            seen.append(message)
            self.poke()
            if len(seen) == 1:
                raise RuntimeError("first time fails")

        await mesh.start()
        sent = msg(7, key="k", correlation_id="corr-7")
        await (await self.connect()).publish(self.dest(), sent)
        await self.until(lambda: len(seen) == 2)
        first, again = seen
        assert (again.id, again.key, again.body, again.correlation_id) == (sent.id, "k", sent.body, "corr-7")
        assert (first.attempt, again.attempt) == (1, 2)

    # -- circuit breaker -------------------------------------------------------------------------

    async def test_open_breaker_pauses_fetching_and_a_good_trial_closes_it(self) -> None:
        arrivals: list[str] = []  # every delivery that reaches the handler's pipeline

        def count_arrivals(next_: Handler) -> Handler:
            async def counted(ctx: Context) -> None:
                arrivals.append(ctx.message.id)
                await next_(ctx)

            return counted

        mesh = self.new_mesh(service="brk", middleware=[count_arrivals])
        broken = True
        runs: list[str] = []

        @mesh.handler(
            self.dest(),
            retry=Retry.none(),
            breaker=Breaker(failures=2, reset=0.5),
            concurrency=1,
        )
        async def call_dependency(message: Message) -> None:
            runs.append(message.id)
            if broken:
                raise ConnectionError("dependency refused")

        states: list[str] = []
        mesh.add_listener(lambda e: states.append(e.state) if isinstance(e, BreakerStateChanged) else None)
        await mesh.start()
        t = await self.connect()
        witness = Recorder()
        await self.sub(t, self.dest(), "witness", witness)
        for i in range(2):
            await t.publish(self.dest(), msg(i))
        await self.until(lambda: states[-1:] == ["open"])
        runs_when_opened = len(runs)
        await self.until(lambda: len(arrivals) == 2)  # both failures are in

        held = [msg(10 + i) for i in range(5)]
        await t.publish_many([Outgoing(destination=self.dest(), message=m) for m in held])
        await witness.wait_count(7, self.timeout)
        if self.clock is None:
            assert states[-1] == "open"
        assert len(runs) == runs_when_opened, "a message was handled while the breaker was open"
        assert len(arrivals) == 2, "a message was delivered while the breaker was open"

        broken = False
        await self.until(lambda: states[-1:] == ["closed"] and set(runs) >= {m.id for m in held})
        assert states[:3] == ["open", "half-open", "closed"]
        assert runs[runs_when_opened] in {m.id for m in held}, "the trial is one of the held messages"

    # -- bulkhead and timeout --------------------------------------------------------------------

    async def test_bulkhead_never_runs_more_than_its_limit(self) -> None:
        mesh = self.new_mesh(service="bulk")
        running = 0
        peak = 0
        done = 0

        @mesh.handler(self.dest(), concurrency=3)
        async def slow(message: Message) -> None:
            nonlocal running, peak, done
            running += 1
            peak = max(peak, running)
            for _ in range(20):
                await asyncio.sleep(0)
            running -= 1
            done += 1
            self.poke()

        await mesh.start()
        t = await self.connect()
        await t.publish_many([Outgoing(destination=self.dest(), message=msg(i)) for i in range(40)])
        await self.until(lambda: done == 40)
        assert peak == 3

    async def test_timed_out_try_is_cancelled_and_retried(self) -> None:
        mesh = self.new_mesh(service="tmo")
        cancelled = 0
        succeeded: list[int] = []

        @mesh.handler(self.dest(), timeout=0.2, retry=self.fast_retry(attempts=3, redeliver=()))
        async def sometimes_hangs(message: Message, ctx: Context) -> None:
            nonlocal cancelled
            if ctx.attempt == 1:
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    cancelled += 1
                    raise
            succeeded.append(ctx.attempt)
            self.poke()

        await mesh.start()
        await (await self.connect()).publish(self.dest(), msg(1))
        await self.until(lambda: bool(succeeded))
        assert cancelled == 1
        assert succeeded == [2]

    # -- idempotency ------------------------------------------------------------------------------

    async def test_duplicates_run_the_handler_once_across_two_consumers(self) -> None:
        store = MemoryIdempotencyStore(clock=self.clock)
        runs = 0
        outcomes: list[Event] = []
        meshes = [self.new_mesh(service="idem") for _ in range(2)]
        for mesh in meshes:

            @mesh.handler(
                self.dest(),
                idempotency=Idempotency(store=store),
                retry=self.fast_retry(attempts=5, redeliver=(0.1, 0.1)),
            )
            async def charge(message: Message) -> None:
                nonlocal runs
                runs += 1
                for _ in range(50):  # long enough for a duplicate to arrive meanwhile
                    await asyncio.sleep(0)

            mesh.add_listener(
                lambda e: outcomes.append(e) if isinstance(e, MessageHandled | MessageDeadLettered) else None
            )
            await mesh.start()
        t = await self.connect()
        copies = [msg(1, idempotency_key="order-1") for _ in range(3)]
        await t.publish_many([Outgoing(destination=self.dest(), message=m) for m in copies])
        await self.until(lambda: len(outcomes) == 3)
        assert runs == 1
        assert all(isinstance(e, MessageHandled) for e in outcomes)
