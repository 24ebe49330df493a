"""Batch handlers on ``memory://``: registration, what ``check`` says, shutdown, the breaker.

What must hold on every transport (order, bad input, retries, budgets) is in the conformance
suite (:mod:`meshlink.testing.conformance_batch`); this file covers the rest.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import pytest
from pydantic import BaseModel

from meshlink import (
    Batch,
    BatchContext,
    Breaker,
    BreakerStateChanged,
    ConfigurationError,
    Context,
    MemoryTransport,
    Mesh,
    Message,
    Retry,
)
from meshlink.check import check_mesh
from meshlink.resilience import Idempotency, MemoryIdempotencyStore, Policies
from meshlink.transport.base import Delivery


class Line(BaseModel):
    n: int


def mesh(name: str | None = None) -> Mesh:
    """A mesh on a broker of its own (``memory://`` with one name is one broker per process)."""
    return Mesh(f"memory://{name or uuid.uuid4().hex}", service="batch")


def test_batch_handler_takes_a_list_and_says_so() -> None:
    m = mesh()

    with pytest.raises(ConfigurationError, match=r"batch.*list\[T\]"):

        @m.handler("d", batch=Batch())
        async def single(line: Line) -> None: ...

    with pytest.raises(ConfigurationError, match="BatchContext"):

        @m.handler("d", batch=Batch())
        async def wrong_ctx(lines: list[Line], ctx: int) -> None: ...

    @m.handler("d", batch=Batch(max_size=7), concurrency=3)
    async def ok(lines: Sequence[Line], ctx: BatchContext) -> None: ...

    spec = m.handlers[0]
    assert spec.payload_type is Line
    assert spec.prefetch == 21, "prefetch = concurrency x max_size"


@pytest.mark.parametrize(
    ("batch", "setting"),
    [
        (lambda: Batch(max_size=0), "batch.max_size"),
        (lambda: Batch(max_wait=-1), "batch.max_wait"),
        (lambda: Batch(max_wait="soon"), "batch.max_wait"),
    ],
)
def test_bad_batch_settings_name_the_setting(batch: object, setting: str) -> None:
    with pytest.raises(ConfigurationError, match=setting.replace(".", r"\.")):
        batch()  # type: ignore[operator]


def test_per_message_policies_are_refused_by_name() -> None:
    store = Idempotency(store=MemoryIdempotencyStore())
    with pytest.raises(ConfigurationError, match="idempotency"):
        mesh().handler("d", batch=Batch(), idempotency=store)
    m = Mesh(f"memory://{uuid.uuid4().hex}", service="s", defaults=Policies(idempotency=store))
    with pytest.raises(ConfigurationError, match="idempotency=None"):
        m.handler("d", batch=Batch())
    m.handler("d", batch=Batch(), idempotency=None)  # explicit opt-out works

    async def uow(next_: object) -> object:
        return next_

    with pytest.raises(ConfigurationError, match="unit_of_work"):
        mesh().handler("d", batch=Batch(), unit_of_work=uow)  # type: ignore[arg-type]


def test_check_describes_the_batches() -> None:
    m = mesh()

    @m.handler("d", batch=Batch(max_size=50, max_wait="20ms"), concurrency=2)
    async def store(lines: list[Line]) -> None: ...

    (report,) = check_mesh(m)
    assert (
        "consumes   d as group batch (prefetch 100), in batches of up to 50 (waiting at most 0.02s), "
        "2 at once"
    ) in report.lines


async def test_stop_lets_a_running_batch_finish_and_gives_back_what_is_gathered() -> None:
    m = mesh()
    started, release = asyncio.Event(), asyncio.Event()
    handled: list[int] = []

    @m.handler("d", batch=Batch(max_size=3, max_wait=30), concurrency=1)
    async def slow(lines: list[Line]) -> None:
        started.set()
        await release.wait()
        handled.extend(x.n for x in lines)

    await m.start()
    for i in range(3):
        await m.publish("d", Line(n=i), key=str(i))
    await started.wait()
    stopping = asyncio.create_task(m.stop(drain_timeout=30))
    await asyncio.sleep(0)
    release.set()
    await stopping
    assert handled == [0, 1, 2], "the running batch finished and was acked"
    assert m.in_flight == 0


async def test_drain_deadline_gives_the_batch_back_unacked() -> None:
    name = uuid.uuid4().hex
    keeper = MemoryTransport(f"memory://{name}")  # holds the broker between the two meshes
    await keeper.connect()
    m = mesh(name)
    started = asyncio.Event()

    @m.handler("d", batch=Batch(max_size=2, max_wait=0))
    async def stuck(lines: list[Line]) -> None:
        started.set()
        await asyncio.Event().wait()

    await m.start()
    await m.publish("d", Line(n=1))
    await started.wait()
    await m.stop(drain_timeout=0)
    # a second mesh on the same broker gets the message again (it was given back, not acked)
    again = mesh(name)
    got: list[list[int]] = []

    @again.handler("d", batch=Batch(max_size=2, max_wait=0))
    async def take(lines: list[Line], ctx: BatchContext) -> None:
        got.append([x.n for x in lines])
        assert all(d.redelivered for d in ctx.deliveries)

    async with again:
        await again.transport.wait_idle()  # type: ignore[attr-defined]
    await keeper.close()
    assert got == [[1]]


async def test_an_open_breaker_gives_the_batch_back_without_spending_it() -> None:
    m = mesh()
    calls: list[tuple[int, list[int]]] = []
    breaker = Breaker(failures=1, reset="1h")

    @m.handler("d", batch=Batch(max_size=5, max_wait=0), breaker=breaker, retry=Retry.none())
    async def call(lines: list[Line], ctx: BatchContext) -> None:
        calls.append((ctx.attempt, [x.n for x in lines]))
        raise RuntimeError("dependency down")

    states: list[str] = []
    m.add_listener(lambda e: states.append(e.state) if isinstance(e, BreakerStateChanged) else None)
    await m.start()
    await m.publish("d", Line(n=1))
    subscriptions = m.dispatchers[0].subscriptions
    # the breaker pauses the subscriptions from its own task, just after it says "open"
    async with asyncio.timeout(10):
        while not ("open" in states and all(s.paused for s in subscriptions)):  # noqa: ASYNC110 - no event reports the pause
            await asyncio.sleep(0)
    await m.publish("d", Line(n=2))
    assert [c[1] for c in calls] == [[1]]
    await m.stop(drain_timeout=0)


async def test_context_lists_the_batch() -> None:
    m = mesh()
    seen: list[BatchContext] = []

    @m.handler("d", batch=Batch(max_size=10, max_wait=0.01))
    async def take(lines: list[Line], ctx: BatchContext) -> None:
        seen.append(ctx)

    await m.start()
    sent = [await m.publish("d", Line(n=i), key=f"k{i}") for i in range(3)]
    await m.transport.wait_idle()  # type: ignore[attr-defined]
    await m.stop()
    ctx = seen[0]
    assert isinstance(ctx, Context)
    assert [x.id for c in seen for x in c.messages] == [s.id for s in sent]
    assert ctx.message is ctx.messages[0]
    assert all(isinstance(d, Delivery) for d in ctx.deliveries)
    assert isinstance(ctx.messages[0], Message)
    assert "size=" in repr(ctx)
