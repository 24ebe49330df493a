"""Shared pieces of the conformance suite (see :mod:`meshlink.testing.conformance`).

The transport conformance suite: one set of behaviours every transport must show.

Every transport — ``memory://``, RabbitMQ, Kafka, and any third party's — proves
itself by running these tests against its real broker::

    from meshlink.testing.conformance import Features, TransportConformance

    class TestMyTransport(TransportConformance):
        features = Features(per_key_order_across_consumers=False)

        def make_transport(self) -> Transport:
            return MyTransport("my://localhost")   # not connected: the suite connects it

The suite creates its own destinations under :attr:`TransportConformance.namespace`
(unique per test), so it can share a broker with anything else. Where brokers
differ by nature, :class:`Features` switches the check, never the semantics.
Waits are on conditions; the only timeouts are guards against hangs.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from meshlink.app import Mesh
from meshlink.clock import FakeClock, SystemClock
from meshlink.message import Message
from meshlink.transport.base import Delivery, Subscription, SubscriptionSpec, Transport

__all__ = ["ConformanceBase", "Features", "Recorder", "msg"]


@dataclass(frozen=True, kw_only=True)
class Features:
    """What a transport's broker can and cannot do; each flag switches one check."""

    per_key_order_across_consumers: bool = True
    """Per-key order holds across competing subscriptions of a group (not RabbitMQ classic)."""
    unroutable_raises: bool = True
    """Publishing where no group is declared raises UnroutableError (not Kafka)."""
    delivery_count: bool = True
    """Deliveries carry a delivery count."""
    fake_clock: bool = False
    """The transport runs on the suite's FakeClock (delays are tested by moving it)."""
    timeout: float = 30.0
    """Hang guard for any single wait, in seconds (never a performance threshold)."""
    real_delay: float = 1.0
    """Delay used by the delayed-publish test on a real clock, in seconds."""


@dataclass
class Recorder:
    """Collects deliveries and lets a test await a count of them."""

    settle: str | None = "ack"
    """How to settle each delivery on arrival: ``"ack"``, ``"reject"``, or ``None`` to keep it."""
    deliveries: list[Delivery] = field(default_factory=list)
    arrived_at: list[float] = field(default_factory=list)
    max_unsettled: int = 0
    _cond: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def ids(self) -> list[str]:
        return [d.message.id for d in self.deliveries]

    def unsettled(self) -> list[Delivery]:
        return [d for d in self.deliveries if d.settled is None]

    async def __call__(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)
        self.arrived_at.append(asyncio.get_running_loop().time())
        self.max_unsettled = max(self.max_unsettled, len(self.unsettled()))
        if self.settle == "ack":
            await delivery.ack()
        elif self.settle == "reject":
            await delivery.reject()
        async with self._cond:
            self._cond.notify_all()

    async def wait_for(self, predicate: Callable[[Recorder], bool], timeout: float) -> None:
        async with self._cond:
            await asyncio.wait_for(self._cond.wait_for(lambda: predicate(self)), timeout)

    async def wait_count(self, n: int, timeout: float) -> None:
        await self.wait_for(lambda r: len(r.deliveries) >= n, timeout)


def msg(n: int, *, key: str | None = None, type: str = "Num", **extra: Any) -> Message:
    """A small test message whose body is its number."""
    return Message(body=str(n).encode(), type=type, source="conformance", key=key, **extra)


class ConformanceBase:
    """Fixtures and helpers every scenario class shares."""

    features: Features = Features()
    namespace: str
    clock: FakeClock | None

    def make_transport(self) -> Transport:
        """Return a new, unconnected transport to the broker under test."""
        raise NotImplementedError

    # -- fixtures and helpers ----------------------------------------------------

    @pytest.fixture(autouse=True)
    async def _conformance_setup(self) -> AsyncIterator[None]:
        self.namespace = f"conf-{uuid.uuid4().hex[:10]}"
        self.clock = FakeClock() if self.features.fake_clock else None
        self._open: list[Transport] = []
        self._meshes: list[Mesh] = []
        self._progress = asyncio.Event()
        yield
        for mesh in reversed(self._meshes):
            await mesh.stop(drain_timeout=0)
        for t in reversed(self._open):
            await t.close()

    async def connect(self) -> Transport:
        t = self.make_transport()
        await t.connect()
        self._open.append(t)
        return t

    def dest(self, name: str = "d") -> str:
        return f"{self.namespace}.{name}"

    async def sub(
        self, t: Transport, dest: str, group: str, rec: Recorder, *, prefetch: int = 16
    ) -> Subscription:
        return await t.subscribe(SubscriptionSpec(destination=dest, group=group, prefetch=prefetch), rec)

    @property
    def timeout(self) -> float:
        return self.features.timeout

    def new_mesh(self, **kwargs: Any) -> Mesh:
        """A mesh on a new transport of the broker under test, stopped after the test.

        It runs on the suite's clock, and every event it emits wakes :meth:`until`.
        """
        mesh = Mesh(self.make_transport(), clock=self.clock or SystemClock(), **kwargs)
        mesh.add_listener(lambda _: self._progress.set())
        self._meshes.append(mesh)
        return mesh

    async def dead_letters(self, mesh: Mesh, handler: str) -> Recorder:
        """Subscribe a recorder to the dead-letter destination of ``handler``."""
        spec = next(h for h in mesh.handlers if h.name == handler)
        t = await self.connect()
        rec = Recorder()
        await self.sub(t, spec.dead_letter, "dlq", rec)
        return rec

    def poke(self) -> None:
        """Wake :meth:`until` (for progress a test records itself)."""
        self._progress.set()

    async def until(self, predicate: Callable[[], bool], *, simulated: float = 3600.0) -> None:
        """Wait until ``predicate()`` holds, re-checking after every mesh event.

        On a fake clock, time moves forward in small steps whenever nothing else
        can happen, so delays, backoffs and breaker resets elapse without waiting.
        """
        clock = self.clock
        async with asyncio.timeout(self.timeout):
            while not predicate():
                if clock is None:
                    self._progress.clear()
                    await self._progress.wait()
                    continue
                for _ in range(20):
                    await asyncio.sleep(0)
                    if predicate():
                        return
                if clock.monotonic() > simulated:
                    raise AssertionError(f"not reached after {simulated:g} simulated seconds")
                await clock.advance(0.05)
