"""Conformance scenarios for batch handlers (:mod:`meshlink.batch`) on the transport under test.

The transport hands over batches natively (Kafka) or through the generic
collector (memory, RabbitMQ); either way the same behaviour must show: every
message handled once, per-key order across batches, batches no larger than
``max_size``, bad input dead-lettered alone, an immediate retry running the
whole batch again, and each message of a failed batch settled on its own
attempt budget. The same :class:`~meshlink.testing.conformance.TransportConformance`
runs them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from pydantic import BaseModel

from meshlink.batch import Batch, BatchContext
from meshlink.errors import Reject
from meshlink.events import Event, MessageDeadLettered
from meshlink.message import Message
from meshlink.resilience.deadletter import ERROR_MESSAGE, ERROR_TYPE, FAILED_ATTEMPTS, HANDLER
from meshlink.resilience.policy import Retry
from meshlink.testing._conformance_base import ConformanceBase
from meshlink.transport.base import Delivery, Outgoing, SubscriptionSpec
from meshlink.transport.batching import BatchLimits

__all__ = ["BatchScenarios", "Line"]


class Line(BaseModel):
    """The payload of the batch scenarios."""

    key: str
    n: int


def line(key: str, n: int) -> Message:
    return Message(body=Line(key=key, n=n).model_dump_json().encode(), type="Line", key=key)


class BatchScenarios(ConformanceBase):
    """Batch handlers on the transport under test."""

    async def test_batch_subscription_hands_over_bounded_batches_in_broker_order(self) -> None:
        t = await self.connect()
        batches: list[list[Delivery]] = []

        async def take(deliveries: Sequence[Delivery]) -> None:
            batches.append(list(deliveries))
            for d in deliveries:
                await d.ack()
            self.poke()

        spec = SubscriptionSpec(destination=self.dest(), group="g", prefetch=40)
        await t.subscribe_batch(spec, take, BatchLimits(max_size=8, max_wait=0.05))
        sent = [line("k", i) for i in range(30)]
        await t.publish_many([_out(self.dest(), m) for m in sent])
        await self.until(lambda: sum(map(len, batches)) >= len(sent))
        assert all(1 <= len(b) <= 8 for b in batches), [len(b) for b in batches]
        got = [d.message.id for b in batches for d in b]
        assert got == [m.id for m in sent], "one key: broker order, each message once"
        assert all(d.settled == "ack" for b in batches for d in b)

    async def test_batch_handler_handles_every_message_once_in_key_order(self) -> None:
        mesh = self.new_mesh(service="batch")
        calls: list[list[Line]] = []

        @mesh.handler(self.dest(), batch=Batch(max_size=10, max_wait=0.05), concurrency=4)
        async def store(lines: list[Line], ctx: BatchContext) -> None:
            assert ctx.size == len(lines) == len(ctx.messages)
            assert [m.key for m in ctx.messages] == [x.key for x in lines]
            calls.append(lines)
            self.poke()

        await mesh.start()
        sent = [line(f"k{i % 4}", i) for i in range(80)]
        t = await self.connect()
        await t.publish_many([_out(self.dest(), m) for m in sent])
        await self.until(lambda: sum(map(len, calls)) >= len(sent))
        assert all(1 <= len(c) <= 10 for c in calls)
        handled = [x.n for c in calls for x in c]
        assert sorted(handled) == list(range(80)), "every message exactly once"
        per_key: dict[str, list[int]] = defaultdict(list)
        for c in calls:
            for x in c:
                per_key[x.key].append(x.n)
        for key, ns in per_key.items():
            assert ns == sorted(ns), f"key {key} out of order: {ns}"

    async def test_bad_input_in_a_batch_is_dead_lettered_alone(self) -> None:
        mesh = self.new_mesh(service="batchbad")
        handled: list[Line] = []

        @mesh.handler(self.dest(), batch=Batch(max_size=10, max_wait=0.05))
        async def store(lines: list[Line]) -> None:
            handled.extend(lines)
            self.poke()

        await mesh.start()
        parked = await self.dead_letters(mesh, "store")
        t = await self.connect()
        bad = Message(body=b'{"key": "a", "n": "many"}', type="Line", key="a")
        await t.publish_many([_out(self.dest(), m) for m in (line("a", 1), bad, line("a", 2), line("b", 3))])
        await parked.wait_count(1, self.timeout)
        await self.until(lambda: len(handled) >= 3)
        assert sorted(x.n for x in handled) == [1, 2, 3]
        dead = parked.deliveries[0].message
        assert dead.id == bad.id
        assert dead.headers[ERROR_TYPE] == "meshlink.errors.DecodeError"
        assert dead.headers[HANDLER] == "store"

    async def test_immediate_retry_runs_the_whole_batch_again(self) -> None:
        mesh = self.new_mesh(service="batchretry")
        tries: list[tuple[int, list[int]]] = []
        handled: list[int] = []

        @mesh.handler(self.dest(), batch=Batch(max_size=5, max_wait=0.05), retry=_fast(attempts=2))
        async def store(lines: list[Line], ctx: BatchContext) -> None:
            tries.append((ctx.attempt, [x.n for x in lines]))
            if ctx.attempt == 1:
                raise RuntimeError("first try of every batch fails")
            handled.extend(x.n for x in lines)
            self.poke()

        await mesh.start()
        t = await self.connect()
        await t.publish_many([_out(self.dest(), line("k", i)) for i in range(12)])
        await self.until(lambda: len(handled) >= 12)
        assert sorted(handled) == list(range(12)), "each handled once, after its batch's retry"
        failed = [ns for attempt, ns in tries if attempt == 1]
        retried = [ns for attempt, ns in tries if attempt == 2]
        assert failed == retried, "the retry ran exactly the batch that failed"

    async def test_each_message_of_a_failing_batch_spends_its_own_budget(self) -> None:
        mesh = self.new_mesh(service="batchbudget")
        seen: dict[int, int] = defaultdict(int)

        @mesh.handler(
            self.dest(),
            batch=Batch(max_size=4, max_wait=0.05),
            retry=_fast(attempts=2, redeliver=(0.2,)),
        )
        async def store(lines: list[Line]) -> None:
            for x in lines:
                seen[x.n] += 1
            raise RuntimeError("store down")

        dead: list[Event] = []
        mesh.add_listener(lambda e: dead.append(e) if isinstance(e, MessageDeadLettered) else None)
        await mesh.start()
        parked = await self.dead_letters(mesh, "store")
        t = await self.connect()
        sent = [line(f"k{i}", i) for i in range(6)]
        await t.publish_many([_out(self.dest(), m) for m in sent])
        await self.until(lambda: len(dead) >= 6)
        await parked.wait_count(6, self.timeout)
        assert dict(seen) == dict.fromkeys(range(6), 4), "budget = 2 tries x (1 + 1 redelivery), each"
        assert {d.message.id for d in parked.deliveries} == {m.id for m in sent}
        for d in parked.deliveries:
            assert d.message.headers[FAILED_ATTEMPTS] == "4"
            assert d.message.headers[ERROR_MESSAGE] == "store down"

    async def test_reject_dead_letters_the_batch_and_the_consumer_goes_on(self) -> None:
        mesh = self.new_mesh(service="batchreject")
        handled: list[int] = []

        @mesh.handler(self.dest(), batch=Batch(max_size=10, max_wait=0.05))
        async def store(lines: list[Line]) -> None:
            if any(x.n < 0 for x in lines):
                raise Reject("negative line in the batch")
            handled.extend(x.n for x in lines)
            self.poke()

        await mesh.start()
        parked = await self.dead_letters(mesh, "store")
        t = await self.connect()
        poison = line("p", -1)
        await t.publish(self.dest(), poison)
        await parked.wait_count(1, self.timeout)
        assert parked.deliveries[0].message.id == poison.id
        assert "negative line" in parked.deliveries[0].message.headers[ERROR_MESSAGE]
        await t.publish_many([_out(self.dest(), line("k", i)) for i in range(5)])
        await self.until(lambda: len(handled) >= 5)
        assert sorted(handled) == list(range(5))


def _fast(attempts: int, redeliver: tuple[float, ...] = (0.2, 0.2)) -> Retry:
    return Retry(attempts=attempts, backoff=0.01, max_backoff=0.01, jitter=0, redeliver=redeliver)


def _out(destination: str, message: Message) -> Outgoing:
    return Outgoing(destination=destination, message=message)
