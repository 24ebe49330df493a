"""The transport conformance suite: one set of behaviours every transport must show.

Every transport — ``memory://``, RabbitMQ, Kafka, and any third party's — proves
itself by running these tests against its real broker::

    from meshlink.testing.conformance import Features, TransportConformance

    class TestMyTransport(TransportConformance):
        features = Features(per_key_order_across_consumers=False)

        def make_transport(self) -> Transport:
            return MyTransport("my://localhost")   # not connected: the suite connects it

Two groups of scenarios: the transport contract itself (this module) and a
:class:`~meshlink.Mesh` running on the transport — shutdown, retries, redelivery,
dead-letters, breaker, bulkhead, timeout, idempotency and bad input
(:mod:`meshlink.testing.conformance_mesh`). The suite creates its own
destinations under a namespace unique per test, so it can share a broker with
anything else. Where brokers differ by nature, :class:`Features` switches the
check, never the semantics. Waits are on conditions; the only timeouts are
guards against hangs.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from meshlink.errors import AlreadySettledError, UnroutableError
from meshlink.message import Message
from meshlink.testing._conformance_base import ConformanceBase, Features, Recorder, msg
from meshlink.testing.conformance_batch import BatchScenarios
from meshlink.testing.conformance_input import InputScenarios
from meshlink.testing.conformance_mesh import MeshScenarios
from meshlink.transport.base import Delivery, Outgoing

__all__ = ["Features", "Recorder", "TransportConformance", "TransportScenarios"]


class TransportScenarios(ConformanceBase):
    """The transport contract, scenario by scenario."""

    # -- publish and consume -------------------------------------------------------

    async def test_round_trip_preserves_envelope_and_headers(self) -> None:
        t = await self.connect()
        rec = Recorder()
        await self.sub(t, self.dest(), "g", rec)
        sent = Message(
            body=b'{"x": 1, "s": "\xc3\xa9"}',
            type="OrderPlaced",
            source="svc-a",
            key="order-7",
            time=datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
            correlation_id="corr-1",
            causation_id="cause-1",
            idempotency_key="idem-1",
            attempt=3,
            headers={"tenant": "acme", "x-custom": "v"},
        )
        await t.publish(self.dest(), sent)
        await rec.wait_count(1, self.timeout)
        got = rec.deliveries[0]
        assert got.message == sent
        assert got.destination == self.dest()
        assert got.group == "g"
        assert got.redelivered is False

    async def test_binary_body_passes_untouched(self) -> None:
        t = await self.connect()
        rec = Recorder()
        await self.sub(t, self.dest(), "g", rec)
        body = bytes(range(256))
        await t.publish(self.dest(), Message(body=body, content_type="application/octet-stream"))
        await rec.wait_count(1, self.timeout)
        assert rec.deliveries[0].message.body == body
        assert rec.deliveries[0].message.content_type == "application/octet-stream"

    async def test_publish_many_delivers_every_message_in_order(self) -> None:
        t = await self.connect()
        rec = Recorder()
        await self.sub(t, self.dest(), "g", rec)
        sent = [msg(i, key="k") for i in range(200)]
        await t.publish_many([Outgoing(destination=self.dest(), message=m) for m in sent])
        await rec.wait_count(200, self.timeout)
        assert rec.ids == [m.id for m in sent]

    async def test_unroutable_publish_raises(self) -> None:
        if not self.features.unroutable_raises:
            pytest.skip("this broker keeps messages for destinations nobody declared")
        t = await self.connect()
        await t.declare(self.dest("nobody"))
        with pytest.raises(UnroutableError):
            await t.publish(self.dest("nobody"), msg(1))

    async def test_declared_group_keeps_messages_until_it_subscribes(self) -> None:
        t = await self.connect()
        await t.declare(self.dest(), "late")
        sent = [msg(i) for i in range(5)]
        for m in sent:
            await t.publish(self.dest(), m)
        rec = Recorder()
        await self.sub(t, self.dest(), "late", rec)
        await rec.wait_count(5, self.timeout)
        assert sorted(rec.ids) == sorted(m.id for m in sent)

    # -- groups --------------------------------------------------------------------

    async def test_competing_consumers_each_message_to_one_member(self) -> None:
        a, b = await self.connect(), await self.connect()
        ra = Recorder()
        rb = Recorder(_cond=ra._cond)  # one condition: a delivery to either wakes the waits below
        await self.sub(a, self.dest(), "g", ra, prefetch=1)
        await self.sub(b, self.dest(), "g", rb, prefetch=1)
        sent = [msg(i, key=f"k{i % 8}") for i in range(100)]
        await a.publish_many([Outgoing(destination=self.dest(), message=m) for m in sent])
        both = Recorder()
        await ra.wait_for(lambda _: len(ra.deliveries) + len(rb.deliveries) >= 100, self.timeout)
        both.deliveries = ra.deliveries + rb.deliveries
        assert sorted(both.ids) == sorted(m.id for m in sent)
        assert ra.deliveries, "first member got nothing"
        assert rb.deliveries, "second member got nothing"

    async def test_fan_out_every_group_gets_every_message(self) -> None:
        t = await self.connect()
        groups = {name: Recorder() for name in ("g1", "g2", "g3")}
        for name, rec in groups.items():
            await self.sub(t, self.dest(), name, rec)
        sent = [msg(i) for i in range(20)]
        for m in sent:
            await t.publish(self.dest(), m)
        for rec in groups.values():
            await rec.wait_count(20, self.timeout)
            assert sorted(rec.ids) == sorted(m.id for m in sent)

    # -- order -------------------------------------------------------------------------

    async def _settle_out_of_order(self, rec: Recorder, stop: asyncio.Event) -> None:
        """Settle held deliveries newest-first, to tempt a transport into reordering a key."""
        while not stop.is_set():
            await rec.wait_for(lambda r: bool(r.unsettled()) or stop.is_set(), self.timeout)
            for d in reversed(rec.unsettled()):
                await d.ack()

    async def test_per_key_order_is_kept_with_many_unsettled(self) -> None:
        t = await self.connect()
        rec = Recorder(settle=None)
        await self.sub(t, self.dest(), "g", rec, prefetch=8)
        sent = [msg(i, key=f"k{i % 5}") for i in range(100)]
        stop = asyncio.Event()
        settler = asyncio.create_task(self._settle_out_of_order(rec, stop))
        await t.publish_many([Outgoing(destination=self.dest(), message=m) for m in sent])
        await rec.wait_count(100, self.timeout)
        stop.set()
        async with rec._cond:
            rec._cond.notify_all()
        await settler
        for k in range(5):
            want = [m.id for m in sent if m.key == f"k{k}"]
            got = [d.message.id for d in rec.deliveries if d.message.key == f"k{k}"]
            assert got == want, f"key k{k} out of order"

    async def test_per_key_order_across_competing_consumers(self) -> None:
        if not self.features.per_key_order_across_consumers:
            pytest.skip("this broker orders per key only within one consumer")
        a, b = await self.connect(), await self.connect()
        ra = Recorder(settle=None)
        rb = Recorder(settle=None, _cond=ra._cond)
        await self.sub(a, self.dest(), "g", ra, prefetch=4)
        await self.sub(b, self.dest(), "g", rb, prefetch=4)
        order: list[str] = []
        orig_a, orig_b = ra.deliveries, rb.deliveries

        class Tap(list[Delivery]):
            def append(self, d: Delivery) -> None:
                order.append(d.message.id)
                super().append(d)

        ra.deliveries, rb.deliveries = Tap(orig_a), Tap(orig_b)
        stop = asyncio.Event()
        settlers = [asyncio.create_task(self._settle_out_of_order(r, stop)) for r in (ra, rb)]
        sent = [msg(i, key=f"k{i % 6}") for i in range(120)]
        await a.publish_many([Outgoing(destination=self.dest(), message=m) for m in sent])
        await ra.wait_for(lambda _: len(order) >= 120, self.timeout)
        stop.set()
        for r in (ra, rb):
            async with r._cond:
                r._cond.notify_all()
        await asyncio.gather(*settlers)
        keyed = {m.id: m.key for m in sent}
        for k in range(6):
            want = [m.id for m in sent if m.key == f"k{k}"]
            assert [i for i in order if keyed[i] == f"k{k}"] == want

    # -- settlement ----------------------------------------------------------------------

    async def test_nacked_message_is_redelivered_and_marked(self) -> None:
        t = await self.connect()
        rec = Recorder(settle=None)
        await self.sub(t, self.dest(), "g", rec)
        sent = msg(1, key="k")
        await t.publish(self.dest(), sent)
        await rec.wait_count(1, self.timeout)
        await rec.deliveries[0].nack(requeue=True)
        await rec.wait_count(2, self.timeout)
        again = rec.deliveries[1]
        assert again.message == sent
        assert again.redelivered is True
        if self.features.delivery_count:
            assert again.delivery_count == 2
        await again.ack()

    async def test_rejected_message_is_not_redelivered(self) -> None:
        t = await self.connect()
        rec = Recorder(settle=None)
        await self.sub(t, self.dest(), "g", rec)
        first, second = msg(1, key="k"), msg(2, key="k")
        await t.publish(self.dest(), first)
        await rec.wait_count(1, self.timeout)
        await rec.deliveries[0].reject()
        await t.publish(self.dest(), second)
        await rec.wait_count(2, self.timeout)
        await rec.deliveries[1].ack()
        assert rec.ids == [first.id, second.id]

    async def test_settling_twice_raises(self) -> None:
        t = await self.connect()
        rec = Recorder(settle=None)
        await self.sub(t, self.dest(), "g", rec)
        await t.publish(self.dest(), msg(1))
        await rec.wait_count(1, self.timeout)
        d = rec.deliveries[0]
        await d.ack()
        with pytest.raises(AlreadySettledError):
            await d.ack()
        with pytest.raises(AlreadySettledError):
            await d.nack()

    async def test_prefetch_bounds_unsettled_deliveries(self) -> None:
        t = await self.connect()
        rec = Recorder(settle=None)
        await self.sub(t, self.dest(), "g", rec, prefetch=3)
        stop = asyncio.Event()
        settler = asyncio.create_task(self._settle_out_of_order(rec, stop))
        await t.publish_many([Outgoing(destination=self.dest(), message=msg(i)) for i in range(60)])
        await rec.wait_count(60, self.timeout)
        stop.set()
        async with rec._cond:
            rec._cond.notify_all()
        await settler
        assert 1 <= rec.max_unsettled <= 3

    # -- pause, resume, stop, close ----------------------------------------------------------

    async def test_pause_holds_deliveries_and_resume_releases_them(self) -> None:
        t = await self.connect()
        paused, witness = Recorder(), Recorder()
        sub = await self.sub(t, self.dest(), "paused", paused)
        await self.sub(t, self.dest(), "witness", witness)
        first = [msg(i) for i in range(5)]
        await t.publish_many([Outgoing(destination=self.dest(), message=m) for m in first])
        await paused.wait_count(5, self.timeout)
        await sub.pause()
        assert sub.paused
        second = [msg(i) for i in range(5, 10)]
        await t.publish_many([Outgoing(destination=self.dest(), message=m) for m in second])
        await witness.wait_count(10, self.timeout)
        assert len(paused.deliveries) == 5, "a paused subscription received a message"
        await sub.resume()
        assert not sub.paused
        await paused.wait_count(10, self.timeout)
        assert sorted(paused.ids) == sorted(m.id for m in first + second)

    async def test_close_returns_unsettled_deliveries_for_redelivery(self) -> None:
        first = await self.connect()
        held = Recorder(settle=None)
        await self.sub(first, self.dest(), "g", held, prefetch=4)
        sent = [msg(i) for i in range(4)]
        await first.publish_many([Outgoing(destination=self.dest(), message=m) for m in sent])
        await held.wait_count(4, self.timeout)
        await first.close()
        second = await self.connect()
        rec = Recorder()
        await self.sub(second, self.dest(), "g", rec)
        await rec.wait_count(4, self.timeout)
        assert sorted(rec.ids) == sorted(m.id for m in sent)
        assert all(d.redelivered for d in rec.deliveries)

    async def test_stopped_subscription_leaves_messages_for_the_next(self) -> None:
        t = await self.connect()
        rec = Recorder()
        sub = await self.sub(t, self.dest(), "g", rec)
        await t.publish(self.dest(), msg(0))
        await rec.wait_count(1, self.timeout)
        await sub.stop()
        later = [msg(i) for i in range(1, 4)]
        for m in later:
            await t.publish(self.dest(), m)
        rec2 = Recorder()
        await self.sub(t, self.dest(), "g", rec2)
        await rec2.wait_count(3, self.timeout)
        assert sorted(rec2.ids) == sorted(m.id for m in later)
        assert len(rec.deliveries) == 1

    # -- delay ---------------------------------------------------------------------------------

    async def test_delayed_publish_is_never_early_and_blocks_nobody(self) -> None:
        t = await self.connect()
        rec = Recorder()
        await self.sub(t, self.dest(), "g", rec)
        delay = 10.0 if self.clock is not None else self.features.real_delay
        late, now = msg(1), msg(2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await t.publish(self.dest(), late, delay=delay)
        await t.publish(self.dest(), now)
        await rec.wait_count(1, self.timeout)
        assert rec.ids == [now.id], "a delayed message overtook nothing or came first"
        if self.clock is not None:
            await self.clock.advance(delay - 0.001)
            await t.publish(self.dest(), marker := msg(3))
            await rec.wait_count(2, self.timeout)
            assert rec.ids == [now.id, marker.id], "delayed message delivered early"
            await self.clock.advance(0.001)
            await rec.wait_count(3, self.timeout)
            assert rec.ids[-1] == late.id
        else:
            await rec.wait_count(2, self.timeout)
            assert rec.ids == [now.id, late.id]
            assert rec.arrived_at[1] - started >= delay, "delayed message delivered early"


class TransportConformance(TransportScenarios, MeshScenarios, InputScenarios, BatchScenarios):
    """Subclass in a ``Test*`` class and implement :meth:`make_transport`."""
