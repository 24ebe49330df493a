"""Batch handler faults found in review (memory transport, core): each test failed before its fix."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from meshlink import Batch, ConfigurationError, Mesh, Message
from meshlink.resilience.idempotency import Idempotency, MemoryIdempotencyStore
from meshlink.transport.base import Delivery, SubscriptionSpec
from meshlink.transport.batching import BatchLimits
from meshlink.transport.memory import MemoryTransport
from waiting import until

# -- handler types ------------------------------------------------------------------------


async def test_a_message_batch_handler_receives_the_envelopes(memory_url: str) -> None:
    """``list[Message]`` is a valid batch payload (inspect_handler accepts it), so the handler
    must get the envelopes. As reviewed it gets ``[True, True, ...]``: the batch dispatcher
    calls ``HandlerSpec.wire_decoder()``, which for a ``Message`` payload only checks the size
    and returns ``True``."""
    mesh = Mesh(memory_url, service="s")
    got: list[object] = []

    @mesh.handler("envs", batch=Batch(max_size=10, max_wait=0.01))
    async def store(messages: list[Message]) -> None:
        got.extend(messages)

    async with mesh:
        sent = [mesh.message({"n": i}) for i in range(3)]
        for m in sent:
            await mesh.publish("envs", m)
        await until(lambda: len(got) >= 3, "the batch handler ran")
    assert all(isinstance(m, Message) for m in got), f"payloads are not envelopes: {got!r}"
    assert [m.id for m in got] == [m.id for m in sent]  # type: ignore[attr-defined]


# -- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize("max_size", [2.5, "10"])
def test_a_max_size_that_is_not_an_int_is_refused_by_name(max_size: object) -> None:
    """``max_size`` is a count: a float slips through (``2.5 >= 1``) and then yields batches of 3
    from the collector, a float prefetch, and ``range(2.5)`` in the Kafka dispatch loop (whose
    task dies: the subscription hands out nothing more); a string fails with a bare TypeError
    instead of a ConfigurationError naming the setting."""
    with pytest.raises(ConfigurationError) as raised:
        Batch(max_size=max_size)  # type: ignore[arg-type]
    assert "batch.max_size" in str(raised.value)


def test_refusing_an_explicit_idempotency_does_not_blame_the_defaults(memory_url: str) -> None:
    """The handler itself asked for idempotency (the mesh has no default): the error must not tell
    the user that "the mesh's defaults set one"."""
    mesh = Mesh(memory_url, service="s")
    with pytest.raises(ConfigurationError) as raised:
        mesh.handler("x", batch=Batch(), idempotency=Idempotency(store=MemoryIdempotencyStore()))
    assert "defaults" not in str(raised.value), str(raised.value)


# -- the generic collector -----------------------------------------------------------------------


async def test_a_paused_batch_subscription_hands_over_nothing_until_resumed(memory_url: str) -> None:
    """Subscription contract: after ``pause()`` returns the callback is not called until
    ``resume()`` (a breaker relies on it). As reviewed, a CollectingSubscription pauses the
    inner subscription only: the collector's timer still fires and hands the gathered
    deliveries over while paused."""
    t = MemoryTransport(memory_url)
    await t.connect()
    batches: list[list[Delivery]] = []

    async def take(deliveries: Sequence[Delivery]) -> None:
        batches.append(list(deliveries))

    spec = SubscriptionSpec(destination="p", group="g", prefetch=10)
    sub = await t.subscribe_batch(spec, take, BatchLimits(max_size=10, max_wait=0.05))
    try:
        await t.publish("p", Message(body=b"{}"))
        collector = sub.collector  # type: ignore[attr-defined]
        await until(lambda: len(collector._pending) == 1, "the delivery reached the collector")
        timer = collector._timer
        assert timer is not None
        await sub.pause()
        # let the collector's timer come due (loop order: its handle runs before ours)
        loop = asyncio.get_running_loop()
        due = loop.create_future()
        loop.call_at(timer.when() + 0.001, due.set_result, None)
        await due
        for task in list(getattr(collector, "_timed", ())):
            await task
        assert batches == [], f"on_batch called while paused: {[len(b) for b in batches]}"
        await sub.resume()
        await until(lambda: len(batches) == 1, "the batch is handed over after resume()")
    finally:
        await t.close()


@pytest.mark.parametrize(
    "limits",
    [
        pytest.param(BatchLimits(max_size=10, max_wait=0.01), id="timer-flush"),
        pytest.param(BatchLimits(max_size=3, max_wait=3600), id="size-flush"),
    ],
)
async def test_a_failing_batch_callback_gives_every_delivery_back(
    memory_url: str, limits: BatchLimits
) -> None:
    """A callback that raises must not strand its deliveries: on the per-delivery path the
    memory transport nacks them ("delivery callback failed; message requeued"), and the native
    Kafka batch subscription nacks the whole batch. The generic collector, as reviewed, loses
    them: a timer flush raises inside a fire-and-forget task (nothing settles the batch), a
    size flush raises into the memory worker, which nacks only the delivery it was handing
    over. The rest stay unsettled until the transport closes (per-key order on the memory
    broker then holds their keys forever)."""
    t = MemoryTransport(memory_url)
    await t.connect()
    calls: list[list[str]] = []

    async def take(deliveries: Sequence[Delivery]) -> None:
        calls.append([d.message.id for d in deliveries])
        if len(calls) == 1:
            raise RuntimeError("subscriber bug")
        for d in deliveries:
            await d.ack()

    spec = SubscriptionSpec(destination="f", group="g", prefetch=10)
    await t.subscribe_batch(spec, take, limits)
    try:
        for i in range(3):
            await t.publish("f", Message(body=b"{}", key=f"k{i}"))
        await until(lambda: len(calls) >= 1, "the first batch was handed over")
        failed = sorted(calls[0])
        assert failed, "the failing call had deliveries"

        def handed_again() -> list[str]:
            return sorted(i for c in calls[1:] for i in c if i in failed)

        await until(
            lambda: handed_again() == failed,
            f"the {len(failed)} deliveries of the failed call handed over again",
            timeout=3.0,
        )
    finally:
        await t.close()


async def test_messages_of_one_key_fill_a_batch_on_the_memory_transport(memory_url: str) -> None:
    """Five waiting messages of one key and ``max_size=5`` make one batch at once (the size
    trigger), as on RabbitMQ and Kafka. As reviewed, the memory broker hands out a key's next
    message only once the previous one is settled, while the collector holds that one until
    its batch is due: every batch has at most one message per key and waits the full
    ``max_wait`` (here an hour: nothing is handed over)."""
    t = MemoryTransport(memory_url)
    await t.connect()
    batches: list[int] = []

    async def take(deliveries: Sequence[Delivery]) -> None:
        batches.append(len(deliveries))
        for d in deliveries:
            await d.ack()

    await t.declare("one-key", "g")
    for _ in range(5):
        await t.publish("one-key", Message(body=b"{}", key="k"))
    spec = SubscriptionSpec(destination="one-key", group="g", prefetch=10)
    await t.subscribe_batch(spec, take, BatchLimits(max_size=5, max_wait=3600))
    try:
        await until(lambda: sum(batches) == 5, f"the five messages handed over (batches so far: {batches})")
        assert batches == [5]
    finally:
        await t.close()
