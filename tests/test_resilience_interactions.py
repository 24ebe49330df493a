"""How the policies interact (breaker with bulkhead and retry, timeout with retry, the
idempotency claim with drain, dead-letter headers after retries and redeliveries): each test
here failed on the code before the fix it covers.

Every test awaits conditions (events, the fake clock's sleepers, the broker's idle
state); time moves only through :class:`~meshlink.clock.FakeClock` where the code
lets it be injected.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from meshlink import Mesh
from meshlink.clock import FakeClock
from meshlink.errors import HandlerTimeoutError
from meshlink.events import MessageGivenBack, MessageHandled, RedeliveryScheduled
from meshlink.resilience.breaker import CLOSED, HALF_OPEN, Breaker, CircuitBreaker
from meshlink.resilience.deadletter import FIRST_FAILED_AT
from meshlink.resilience.idempotency import Claim, Idempotency, MemoryIdempotencyStore
from meshlink.resilience.policy import Retry
from meshlink.resilience.retry import iso
from meshlink.resilience.timeout import Timeout
from meshlink.testing import MeshHarness


async def _until(condition: Callable[[], bool], *, limit: float = 5.0) -> None:
    """Yield to the loop until ``condition()`` holds (bounded, never a fixed sleep)."""
    async with asyncio.timeout(limit):
        while not condition():  # noqa: ASYNC110 - the conditions read state no event reports
            await asyncio.sleep(0)


# -- 1. dead-letter headers: first-failed-at of a message that failed in one round --------------


async def test_dead_letter_keeps_the_first_failure_time_of_immediate_retries(
    memory_url: str, fake_clock: FakeClock
) -> None:
    """Three tries in process, 10 s and 20 s apart, then the dead-letter destination: its
    ``first-failed-at`` must be the time of the first try's failure, not of the last one."""
    mesh = Mesh(memory_url, service="svc", clock=fake_clock)

    @mesh.handler(
        "jobs",
        retry=Retry(attempts=3, backoff=10, max_backoff=100, jitter=0, redeliver=()),
        timeout=None,
    )
    async def work(job: dict[str, int]) -> None:
        raise RuntimeError("database down")

    started = fake_clock.time()
    async with MeshHarness(mesh) as h:
        await h.publish("jobs", {"n": 1})
        while not h.dead_lettered:
            await fake_clock.wait_for_sleepers(1)
            await fake_clock.advance(100)
            await _until(lambda: bool(h.dead_lettered) or fake_clock.sleepers > 0)
        await h.idle()
        (parked,) = mesh.transport.broker.peek("jobs.svc.dlq", "dlq")  # type: ignore[attr-defined]
    assert [e.reason for e in h.dead_lettered] == ["attempt budget of 3 exhausted: database down"]
    assert parked.headers[FIRST_FAILED_AT] == iso(started)  # was the time of the third failure


# -- 2. breaker opens while a message waits for a bulkhead slot -----------------------------------


async def test_message_waiting_in_the_bulkhead_does_not_run_after_the_breaker_opened(
    memory_url: str,
) -> None:
    """concurrency=1 and two subscriptions (destination + retry destination) let a second
    message pass the breaker's gate and queue in the bulkhead. Once the first one opens the
    circuit, the queued one must go back without running (the dependency is down)."""
    mesh = Mesh(memory_url, service="svc")
    calls: list[str] = []
    gate = asyncio.Event()

    @mesh.handler(
        "d",
        concurrency=1,
        breaker=Breaker(failures=1, reset="1h"),
        retry=Retry(attempts=1, redeliver=["1h"]),
        timeout=None,
    )
    async def work(job: dict[str, str]) -> None:
        calls.append(job["id"])
        if job["id"] == "A":
            await gate.wait()
            raise ConnectionError("dependency down")

    async with MeshHarness(mesh) as h:
        (dispatcher,) = mesh.dispatchers
        await h.publish("d", {"id": "A"})
        await _until(lambda: calls == ["A"])
        await h.publish("d.svc.retry", {"id": "B"})  # the handler's own retry destination
        await _until(lambda: len(dispatcher.bulkhead._waiters) == 1)  # B passed the gate, waits
        gate.set()

        def b_settled(h: MeshHarness) -> bool:
            return any(
                isinstance(e, MessageGivenBack | MessageHandled) and e.message.body == b'{"id":"B"}'
                for e in h.events
            )

        await h.wait_for(b_settled)
        assert dispatcher.breaker is not None
        assert dispatcher.breaker.state == "open"
        assert calls == ["A"], "B ran against a dependency the breaker had declared down"


async def test_a_retry_waiting_out_its_backoff_goes_back_when_the_breaker_opened_meanwhile(
    memory_url: str, fake_clock: FakeClock
) -> None:
    """Two handlers share one breaker. B fails once in ``retrying`` and waits out its backoff;
    meanwhile A fails in ``once`` and opens the circuit. B's next try must not call the dead
    dependency: it goes back to the broker."""
    mesh = Mesh(memory_url, service="svc", clock=fake_clock)
    calls: list[str] = []
    shared = Breaker(name="dependency", failures=1, reset="1h")

    @mesh.handler("y", breaker=shared, retry=Retry(attempts=3, backoff=10, jitter=0, redeliver=["1h"]))
    async def retrying(job: dict[str, str]) -> None:
        calls.append(job["id"])
        if calls.count("B") == 1:
            raise RuntimeError("transient hiccup")  # B's first try: retried in process

    @mesh.handler("x", breaker=shared, retry=Retry(attempts=1, redeliver=["1h"]))
    async def once(job: dict[str, str]) -> None:
        calls.append(job["id"])
        raise ConnectionError("dependency down")

    async with MeshHarness(mesh) as h:
        await h.publish("y", {"id": "B"})
        await fake_clock.wait_for_sleepers(1)  # B waits out its backoff
        await h.publish("x", {"id": "A"})
        breaker = mesh.dispatchers[0].breaker
        assert breaker is not None
        await _until(lambda: breaker.state == "open")
        await fake_clock.advance(10)

        def b_given_back(h: MeshHarness) -> bool:
            return any(isinstance(e, MessageGivenBack) and e.message.body == b'{"id":"B"}' for e in h.events)

        await h.wait_for(b_given_back)
    assert calls == ["B", "A"], "B's retry ran against a dependency the breaker had declared down"


# -- 3. breaker: the trial's pause and the close's resume interleave -----------------------------


class _SlowSubscription:
    """A subscription whose pause/resume talk to the broker, shaped like the RabbitMQ adapter's:
    the flag is set first, then the round trip (basic.cancel is slower than basic.consume)."""

    def __init__(self) -> None:
        self.paused = False

    async def pause(self) -> None:
        if self.paused:
            return
        self.paused = True
        for _ in range(3):  # basic.cancel, cancel-ok, give the inbox back
            await asyncio.sleep(0)

    async def resume(self) -> None:
        if not self.paused:
            return
        self.paused = False
        await asyncio.sleep(0)  # basic.consume


async def test_a_successful_half_open_trial_leaves_every_subscription_consuming(
    fake_clock: FakeClock,
) -> None:
    breaker = CircuitBreaker(Breaker(failures=1, reset=10), name="b", clock=fake_clock)
    subs = [_SlowSubscription(), _SlowSubscription()]
    for s in subs:
        breaker.attach(s)
    await breaker.start()

    async def fails() -> None:
        raise ConnectionError("down")

    async def succeeds() -> None:
        return None

    async def settled() -> None:
        while breaker._tasks - {breaker._timer}:
            await asyncio.wait(breaker._tasks - {breaker._timer})

    with contextlib.suppress(ConnectionError):
        await breaker.run(fails)
    await fake_clock.wait_for_sleepers(1)
    await settled()
    assert all(s.paused for s in subs)
    await fake_clock.advance(10)
    await _until(lambda: breaker.state == HALF_OPEN)
    await settled()
    assert not any(s.paused for s in subs)

    await breaker.run(succeeds)  # the one trial: succeeds, circuit closes
    await settled()
    assert breaker.state == CLOSED
    assert [s.paused for s in subs] == [False, False], "closed circuit, subscription left paused"
    await breaker.stop()


# -- 4. drain cancels a handler that returned, while idempotency records it -----------------------


class _SlowCompleteStore(MemoryIdempotencyStore):
    """A store whose ``complete`` is a network round trip (Redis, SQL)."""

    def __init__(self) -> None:
        super().__init__()
        self.completing = asyncio.Event()
        self.gate = asyncio.Event()
        self.cancelled_in_complete = False

    async def complete(self, key: str, *, token: str, ttl: float) -> None:
        self.completing.set()
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled_in_complete = True
            raise
        await super().complete(key, token=token, ttl=ttl)


async def test_drain_does_not_cancel_a_handler_that_returned_while_its_key_is_recorded(
    memory_url: str,
) -> None:
    """The handler has returned and the idempotency store is recording its key when the
    drain deadline passes: the drain must let that finish (ack, key done), not cancel it,
    give the message back (it runs again) and leave the key claimed for the whole lease."""
    store = _SlowCompleteStore()
    mesh = Mesh(memory_url, service="svc", drain_timeout=0)
    ran: list[int] = []

    @mesh.handler("d", idempotency=Idempotency(store=store, lease="5m"))
    async def work(job: dict[str, int]) -> None:
        ran.append(job["n"])

    async with MeshHarness(mesh) as h:
        sent = await h.publish("d", {"n": 1})
        await store.completing.wait()  # the handler has returned; its key is being recorded
        # Safety net for a correct drain, which waits for this task: the store answers later.
        # The drain under review cancels at its 0 s deadline, long before this fires.
        asyncio.get_running_loop().call_later(0.5, store.gate.set)
    # leaving the block stops the mesh with a drain deadline of 0 s
    given_back = [e for e in h.events if isinstance(e, MessageGivenBack)]
    key = f"work:{sent.idempotency_key}"
    claim = await store.claim(key, token="probe", lease=60)
    assert ran == [1]
    assert not store.cancelled_in_complete, "a handler that returned was cancelled by the drain"
    assert given_back == [], "the finished message went back to the broker and will run again"
    assert claim is not Claim.IN_PROGRESS, "the key stays claimed: its redelivery cannot run for 5 min"


# -- 5. a timeout (and a duplicate in progress) counts as transient under any Retry.transient -----


async def test_a_timed_out_try_is_transient_even_when_transient_types_are_narrowed(
    memory_url: str, fake_clock: FakeClock
) -> None:
    mesh = Mesh(memory_url, service="svc", clock=fake_clock)

    @mesh.handler(
        "d",
        retry=Retry(attempts=1, redeliver=["5s"], transient=(ConnectionError,)),
        timeout="1s",
    )
    async def work(job: dict[str, int]) -> None:
        await asyncio.Event().wait()  # hangs until the timeout cancels it

    async with MeshHarness(mesh) as h:
        await h.publish("d", {"n": 1})
        await fake_clock.wait_for_sleepers(1)
        await fake_clock.advance(1)
        await h.wait_for(
            lambda h: bool(h.dead_lettered) or any(isinstance(e, RedeliveryScheduled) for e in h.events)
        )
        assert h.dead_lettered == [], h.dead_lettered[0].reason
        assert isinstance(h.failed[0].error, HandlerTimeoutError)


# -- 6. the bounded memory store evicts claims still in progress ----------------------------------


async def test_memory_store_never_evicts_a_claim_in_progress() -> None:
    store = MemoryIdempotencyStore(max_keys=2)
    assert await store.claim("h:a", token="t1", lease=300) is Claim.CLAIMED  # handler of a runs
    assert await store.claim("h:b", token="t2", lease=300) is Claim.CLAIMED
    await store.complete("h:b", token="t2", ttl=3600)
    assert await store.claim("h:c", token="t3", lease=300) is Claim.CLAIMED  # pushes the oldest out
    # a concurrent duplicate of a, while a's handler still runs:
    assert await store.claim("h:a", token="t4", lease=300) is Claim.IN_PROGRESS


# -- 7. Timeout on an injected clock: a converted cancel leaves the task cancelling --------------


async def test_timeout_on_an_injected_clock_takes_back_its_cancel_when_the_try_turns_it_into_an_error(
    fake_clock: FakeClock,
) -> None:
    """A try that turns the timeout's cancel into its own error (drivers do) must leave no
    cancel pending: the next try's timeout must be a HandlerTimeoutError, not a shutdown."""
    timeout = Timeout(1, clock=fake_clock)

    async def converts() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise ConnectionError("driver aborted the query") from None

    async def hangs() -> None:
        await asyncio.Event().wait()

    async def two_tries() -> tuple[str, str, int]:
        outcomes = []
        for fn in (converts, hangs):
            try:
                await timeout.run(fn)
                outcomes.append("ok")
            except ConnectionError:
                outcomes.append("ConnectionError")
            except HandlerTimeoutError:
                outcomes.append("HandlerTimeoutError")
        task = asyncio.current_task()
        assert task is not None
        return outcomes[0], outcomes[1], task.cancelling()

    runner = asyncio.get_running_loop().create_task(two_tries())
    for _ in range(2):
        await fake_clock.wait_for_sleepers(1)
        await fake_clock.advance(1)
    await asyncio.wait({runner})
    assert not runner.cancelled(), "the second timeout surfaced as a cancel of the whole delivery"
    assert runner.result() == ("ConnectionError", "HandlerTimeoutError", 0)


async def test_timeout_turned_into_an_error_then_a_second_timeout_spends_the_budget(
    memory_url: str, fake_clock: FakeClock
) -> None:
    """The same, through a mesh: the second timed-out try must be dead-lettered (budget 2),
    not given back to the broker as if the mesh were stopping (which spends nothing)."""
    mesh = Mesh(memory_url, service="svc", clock=fake_clock, drain_timeout=0)
    calls = 0

    @mesh.handler("d", retry=Retry(attempts=2, backoff=1, jitter=0, redeliver=()), timeout="5s")
    async def work(job: dict[str, int]) -> None:
        nonlocal calls
        calls += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            if calls == 1:
                raise ConnectionError("driver aborted the query") from None
            raise

    async with MeshHarness(mesh) as h:
        await h.publish("d", {"n": 1})

        def settled(h: MeshHarness) -> bool:
            return bool(h.dead_lettered) or any(isinstance(e, MessageGivenBack) for e in h.events)

        while not settled(h):
            await fake_clock.wait_for_sleepers(1)
            await fake_clock.advance(5)
            await _until(lambda: settled(h) or fake_clock.sleepers > 0)
        given_back = [e for e in h.events if isinstance(e, MessageGivenBack)]
        assert given_back == [], f"given back without spending its budget: {given_back[0].reason}"
        assert len(h.dead_lettered) == 1


# -- 8. dead-letter after a redelivery: "original" location is the retry copy's ------------------


async def test_dead_letter_after_redelivery_names_the_original_location(
    memory_url: str, fake_clock: FakeClock, monkeypatch: Any
) -> None:
    """On a partitioned broker (Kafka) a delivery knows its topic/partition/offset. After a
    redelivery through the retry destination, the dead-lettered copy must still say where the
    original message was, next to ``original-destination`` — not the retry copy's place."""
    from meshlink.transport.memory_broker import MemoryDelivery

    # memory:// has no partitions: give its deliveries a Kafka-like location
    monkeypatch.setattr(
        MemoryDelivery,
        "location",
        property(lambda self: {"topic": self.destination, "partition": "0"}),
        raising=False,
    )
    mesh = Mesh(memory_url, service="svc", clock=fake_clock)

    @mesh.handler("d", retry=Retry(attempts=1, redeliver=["5s"]), timeout=None)
    async def work(job: dict[str, int]) -> None:
        raise RuntimeError("database down")

    async with MeshHarness(mesh) as h:
        await h.publish("d", {"n": 1})
        await h.wait_for(lambda h: any(isinstance(e, RedeliveryScheduled) for e in h.events))
        await fake_clock.wait_for_sleepers(1)
        await fake_clock.advance(5)
        await h.wait_for(lambda h: bool(h.dead_lettered))
        await h.idle()
        (parked,) = mesh.transport.broker.peek("d.svc.dlq", "dlq")  # type: ignore[attr-defined]
    assert parked.headers["x-meshlink-original-destination"] == "d"
    assert parked.headers["x-meshlink-original-topic"] == "d", "location of the retry copy, not the original"


# -- a duplicate waiting for its twin -------------------------------------------------------------


async def test_a_duplicate_waiting_for_its_twin_spends_no_attempt_and_is_never_dead_lettered(
    memory_url: str, fake_clock: FakeClock
) -> None:
    """The copy that finds its key claimed never ran the handler: it waits for the twin
    (redelivered with the same attempt), then is skipped once the twin is done. With a budget of
    one execution it used to be dead-lettered at once."""
    from meshlink.events import DuplicateSkipped

    mesh = Mesh(memory_url, service="svc", clock=fake_clock)
    store = MemoryIdempotencyStore(clock=fake_clock)
    runs: list[int] = []
    gate = asyncio.Event()

    @mesh.handler(
        "orders",
        concurrency=2,
        timeout=None,
        retry=Retry(attempts=1, redeliver=[]),
        idempotency=Idempotency(store=store),
    )
    async def charge(order: dict[str, int]) -> None:
        runs.append(order["n"])
        await gate.wait()

    async with MeshHarness(mesh) as h:
        await h.publish("orders", {"n": 1}, idempotency_key="order-1")
        await _until(lambda: runs == [1])
        await h.publish("orders", {"n": 2}, idempotency_key="order-1")

        def waiting(h: MeshHarness) -> bool:
            return any(isinstance(e, RedeliveryScheduled) for e in h.events)

        await h.wait_for(waiting)
        (wait,) = [e for e in h.events if isinstance(e, RedeliveryScheduled)]
        assert wait.message.attempt == 1  # no execution spent
        gate.set()
        await h.wait_for(lambda h: any(isinstance(e, MessageHandled) for e in h.events))
        await fake_clock.advance(wait.delay)
        await h.wait_for(lambda h: any(isinstance(e, DuplicateSkipped) for e in h.events))
        assert h.dead_lettered == []
    assert runs == [1]


async def test_a_settlement_that_never_finishes_does_not_hold_the_shutdown(
    memory_url: str, monkeypatch: Any
) -> None:
    """The handler returned, but recording its key hangs (a store that stopped answering):
    the drain lets it finish for a grace period, then cancels it; the message goes back."""
    import meshlink.dispatch

    monkeypatch.setattr(meshlink.dispatch, "_SETTLE_GRACE", 0.05)

    class Hanging(MemoryIdempotencyStore):
        async def complete(self, key: str, *, token: str, ttl: float) -> None:
            returned.set()
            await asyncio.Event().wait()  # never answers

    returned = asyncio.Event()
    mesh = Mesh(memory_url, service="svc")

    @mesh.handler("orders", idempotency=Idempotency(store=Hanging()), timeout=None)
    async def charge(order: dict[str, int]) -> None:
        pass

    await mesh.start()
    await mesh.publish("orders", {"n": 1})
    await returned.wait()
    await mesh.stop(drain_timeout=0)  # returns: the hung settlement was cancelled after the grace
    assert mesh.in_flight == 0


async def test_a_breaker_opened_by_failures_before_it_started_pauses_its_subscriptions(
    fake_clock: FakeClock,
) -> None:
    """A broker may deliver as soon as a handler subscribes, before the mesh starts its
    breakers: a circuit opened then must still pause consumption (the change was dropped, and
    pybreaker stayed open while meshlink's state said closed, for good)."""
    breaker = CircuitBreaker(Breaker(failures=1, reset="1h"), name="early", clock=fake_clock)
    sub = _SlowSubscription()
    breaker.attach(sub)

    async def failing() -> None:
        raise ConnectionError("dependency down")

    with contextlib.suppress(ConnectionError):
        await breaker.run(failing)
    await _until(lambda: sub.paused)
    assert breaker.state == "open"
    await breaker.start()
    assert sub.paused
    await breaker.stop()


async def test_a_try_retried_after_the_handler_returned_is_cancelled_at_the_drain_deadline(
    memory_url: str, monkeypatch: Any
) -> None:
    """The handler returned, then the unit of work's commit failed and the retry runs the
    handler again: that new try is running, not settling, so the drain deadline cancels it
    (it was left to the much longer settle grace)."""
    import meshlink.dispatch

    monkeypatch.setattr(meshlink.dispatch, "_SETTLE_GRACE", 3600.0)
    tries: list[int] = []
    second = asyncio.Event()

    def commit_fails_once(next_: Any) -> Any:
        async def run(ctx: Any) -> None:
            await next_(ctx)
            if len(tries) == 1:
                raise ConnectionError("commit lost")

        return run

    mesh = Mesh(memory_url, service="svc")

    retry = Retry(attempts=3, backoff=0.001, jitter=0)

    @mesh.handler("orders", timeout=None, unit_of_work=commit_fails_once, retry=retry)
    async def charge(order: dict[str, int]) -> None:
        tries.append(order["n"])
        if len(tries) == 2:
            second.set()
            await asyncio.Event().wait()  # the retried try hangs

    await mesh.start()
    await mesh.publish("orders", {"n": 1})
    await second.wait()
    async with asyncio.timeout(30):  # hang guard: the grace is an hour
        await mesh.stop(drain_timeout=0)
    assert mesh.in_flight == 0
