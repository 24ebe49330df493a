"""The broker behind ``memory://``: queues per group, competing subscriptions, per-key order.

See :mod:`meshlink.transport.memory` for the behaviour; this module holds the
broker's state and its subscriptions, the transport there is the public face.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
from collections import deque

import structlog

from meshlink.clock import Clock
from meshlink.errors import TransportClosedError
from meshlink.message import Message
from meshlink.transport.base import (
    Delivery,
    DeliveryCallback,
    Settlement,
    Subscription,
    SubscriptionSpec,
)

__all__ = ["MemoryBroker", "MemoryDelivery", "MemorySubscription"]

_log = structlog.get_logger("meshlink.memory")


_SEQ = itertools.count()


class _Entry:
    __slots__ = ("count", "message", "seq")

    def __init__(self, message: Message) -> None:
        self.message = message
        self.count = 0
        self.seq = next(_SEQ)
        """Arrival order: a message given back returns to its place, as on RabbitMQ."""


def _seq_of(entry: _Entry) -> int:
    return entry.seq


class _Group:
    __slots__ = ("busy_keys", "destination", "name", "ready", "subs", "turn")

    def __init__(self, destination: str, name: str) -> None:
        self.destination = destination
        self.name = name
        self.ready: deque[_Entry] = deque()
        self.busy_keys: dict[str, _Hold] = {}
        """Keys with a message handed out: to whom, and how many of the key's messages."""
        self.subs: list[MemorySubscription] = []
        self.turn = itertools.count()

    def hold(self, key: str, sub: MemorySubscription) -> bool:
        """Take ``key`` for ``sub``: free keys, and more messages of a key a batch subscription
        holds already (it hands them over in order, in one batch or batches kept in order)."""
        held = self.busy_keys.get(key)
        if held is None:
            self.busy_keys[key] = _Hold(sub)
            return True
        if held.sub is sub and sub.batching:
            held.count += 1
            return True
        return False

    def unhold(self, key: str) -> None:
        held = self.busy_keys.get(key)
        if held is not None:
            held.count -= 1
            if held.count <= 0:
                del self.busy_keys[key]


class _Hold:
    __slots__ = ("count", "sub")

    def __init__(self, sub: MemorySubscription) -> None:
        self.sub = sub
        self.count = 1


class MemoryBroker:
    """The shared state behind every ``memory://NAME`` transport of one name."""

    def __init__(self, name: str, clock: Clock) -> None:
        self.name = name
        self.clock = clock
        self.destinations: dict[str, dict[str, _Group]] = {}
        self.delayed: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()

    # -- inspection -------------------------------------------------------------

    def depth(self, destination: str, group: str) -> int:
        """Messages ready (not handed out) in a group queue."""
        g = self.destinations.get(destination, {}).get(group)
        return len(g.ready) if g else 0

    def peek(self, destination: str, group: str) -> list[Message]:
        """The messages ready in a group queue, head first, without consuming them."""
        g = self.destinations.get(destination, {}).get(group)
        return [e.message for e in g.ready] if g else []

    def unsettled(self, destination: str, group: str) -> int:
        """Deliveries of a group handed out and not yet settled."""
        g = self.destinations.get(destination, {}).get(group)
        return sum(len(s.unsettled) for s in g.subs) if g else 0

    def is_idle(self) -> bool:
        """True when no consumed group has a ready or unsettled message."""
        for groups in self.destinations.values():
            for g in groups.values():
                if any(s.unsettled for s in g.subs):
                    return False
                if g.ready and any(not s.stopped for s in g.subs):
                    return False
        return True

    async def wait_idle(self) -> None:
        """Wait until :meth:`is_idle` (delayed messages not yet due do not count)."""
        while not self.is_idle():
            self._changed.clear()
            await self._changed.wait()

    # -- routing ----------------------------------------------------------------

    def declare(self, destination: str, group: str | None) -> _Group | None:
        groups = self.destinations.setdefault(destination, {})
        if group is None:
            return None
        g = groups.get(group)
        if g is None:
            g = groups[group] = _Group(destination, group)
        return g

    def check_routable(self, destination: str) -> bool:
        return bool(self.destinations.get(destination))

    def route(self, destination: str, message: Message) -> None:
        for g in self.destinations.get(destination, {}).values():
            g.ready.append(_Entry(message))
            self.pump(g)
        self.touch()

    def schedule(self, destination: str, message: Message, delay: float) -> None:
        async def fire() -> None:
            await self.clock.sleep(delay)
            self.route(destination, message)

        task = asyncio.get_running_loop().create_task(fire(), name=f"memory-delay:{destination}")
        self.delayed.add(task)
        task.add_done_callback(self.delayed.discard)

    def pump(self, g: _Group) -> None:
        """Hand ready messages to subscriptions with room, keeping per-key order."""
        while g.ready:
            n = len(g.subs)
            for _ in range(n):
                sub = g.subs[next(g.turn) % n]
                if not sub.has_room():
                    continue
                entry = self._take_dispatchable(g, sub)
                if entry is not None:
                    sub.assign(entry)
                    break
                # what one plain subscription cannot take, no other plain one can either;
                # only a batch subscription holding a key may take more of it
                if not sub.batching and not any(s.batching for s in g.subs):
                    return
            else:
                return

    @staticmethod
    def _take_dispatchable(g: _Group, sub: MemorySubscription) -> _Entry | None:
        for i, entry in enumerate(g.ready):
            key = entry.message.key
            if key is None or g.hold(key, sub):
                del g.ready[i]
                return entry
        return None

    def give_back(self, g: _Group, entries: list[_Entry], *, redelivered: bool) -> None:
        """Put entries back where they were in the group queue (the queue stays in arrival
        order, as RabbitMQ keeps a requeued message's position)."""
        for entry in entries:
            key = entry.message.key
            if key is not None:
                held = g.busy_keys.get(key)
                if held is not None and held.sub.batching and held.count > 1:
                    # the batch subscription took later messages of the key already: those
                    # not handed over yet go back too, so that this one comes first again
                    held.sub.return_key(key)
                g.unhold(key)
            if redelivered:
                entry.count += 1
            g.ready.insert(bisect.bisect_left(g.ready, entry.seq, key=_seq_of), entry)
        self.pump(g)
        self.touch()

    def release(self, g: _Group, entry: _Entry) -> None:
        if entry.message.key is not None:
            g.unhold(entry.message.key)
        self.pump(g)
        self.touch()

    def touch(self) -> None:
        self._changed.set()


class MemoryDelivery(Delivery):
    __slots__ = ("_entry", "_sub")

    def __init__(self, sub: MemorySubscription, entry: _Entry) -> None:
        super().__init__(
            entry.message,
            destination=sub.group.destination,
            group=sub.group.name,
            redelivered=entry.count > 0,
            delivery_count=entry.count + 1,
        )
        self._sub = sub
        self._entry = entry

    def ack_now(self) -> bool:
        self._claim(Settlement.ACK)
        self._sub.settle(self, requeue=False)
        return True

    async def _do_ack(self) -> None:
        self._sub.settle(self, requeue=False)

    async def _do_nack(self) -> None:
        self._sub.settle(self, requeue=True)

    async def _do_reject(self) -> None:
        self._sub.settle(self, requeue=False)


class MemorySubscription(Subscription):
    def __init__(
        self,
        broker: MemoryBroker,
        group: _Group,
        spec: SubscriptionSpec,
        on_delivery: DeliveryCallback,
        *,
        batching: bool = False,
    ) -> None:
        self.spec = spec
        self.broker = broker
        self.group = group
        self.on_delivery = on_delivery
        self.batching = batching
        """Feeds a batch collector: may take more messages of a key it holds (see ``_Group.hold``)."""
        self.inbox: deque[MemoryDelivery] = deque()
        self.unsettled: set[MemoryDelivery] = set()
        self.stopped = False
        self._paused = False
        self._wake = asyncio.Event()
        self._worker = asyncio.get_running_loop().create_task(
            self._run(), name=f"memory-consumer:{spec.destination}/{spec.group}"
        )

    @property
    def paused(self) -> bool:
        return self._paused

    def has_room(self) -> bool:
        return not self._paused and not self.stopped and len(self.unsettled) < self.spec.prefetch

    def assign(self, entry: _Entry) -> None:
        delivery = MemoryDelivery(self, entry)
        self.unsettled.add(delivery)
        self.inbox.append(delivery)
        self._wake.set()

    def settle(self, delivery: MemoryDelivery, *, requeue: bool) -> None:
        if delivery not in self.unsettled:
            return  # link gone (transport closed): the broker already took it back
        self.unsettled.discard(delivery)
        if requeue:
            self.broker.give_back(self.group, [delivery._entry], redelivered=True)
        else:
            self.broker.release(self.group, delivery._entry)

    async def _run(self) -> None:
        while True:
            while not self.inbox or self._paused:
                self._wake.clear()
                await self._wake.wait()
            delivery = self.inbox.popleft()
            try:
                await self.on_delivery(delivery)
            except Exception:
                _log.exception("delivery callback failed; message requeued", message_id=delivery.message.id)
                if delivery.settled is None:
                    await delivery.nack(requeue=True)

    def return_key(self, key: str) -> None:
        """Deliveries of ``key`` assigned but not yet handed over go back to the group queue."""
        mine = [d for d in self.inbox if d.message.key == key]
        if not mine:
            return
        for d in mine:
            self.inbox.remove(d)
            self.unsettled.discard(d)
        entries = [d._entry for d in mine]
        for entry in entries:
            self.group.unhold(key)
            self.group.ready.insert(bisect.bisect_left(self.group.ready, entry.seq, key=_seq_of), entry)

    def _return_inbox(self) -> None:
        """Deliveries assigned but not yet handed over go back to the group queue."""
        if not self.inbox:
            return
        returned = list(self.inbox)
        self.inbox.clear()
        for d in returned:
            self.unsettled.discard(d)
        self.broker.give_back(self.group, [d._entry for d in returned], redelivered=False)

    async def pause(self) -> None:
        if self.stopped:
            raise TransportClosedError("subscription is stopped", destination=self.spec.destination)
        self._paused = True
        self._return_inbox()

    async def resume(self) -> None:
        if self.stopped:
            raise TransportClosedError("subscription is stopped", destination=self.spec.destination)
        self._paused = False
        self._wake.set()
        self.broker.pump(self.group)

    async def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker
        self._return_inbox()
        self.broker.touch()

    async def detach(self) -> None:
        """Stop, then return every unsettled delivery to the broker (transport close)."""
        await self.stop()
        if self in self.group.subs:
            self.group.subs.remove(self)
        pending = list(self.unsettled)
        self.unsettled.clear()
        if pending:
            self.broker.give_back(self.group, [d._entry for d in pending], redelivered=True)
        self.broker.touch()
