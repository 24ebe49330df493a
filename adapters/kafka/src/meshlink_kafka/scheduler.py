"""Fetched records waiting to be handed out, with per-key order and concurrency across keys.

A record may be handed out when no earlier record of its key (within its
partition) is still buffered ahead of it or unsettled. Records without a key
carry no order constraint. Hand-written because aiokafka orders by partition
only; the structure keeps every operation O(1) so that thousands of waiting
records of a slow key cost nothing for the others.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import Generic, Protocol, TypeVar

__all__ = ["KeyScheduler", "RecordBuffer", "Schedulable"]


class Schedulable(Protocol):
    """What the scheduler needs of a record."""

    @property
    def partition_key(self) -> Hashable:
        """The partition the record came from."""
        ...

    @property
    def order_key(self) -> Hashable | None:
        """The record's key within its partition, ``None`` for no order constraint."""
        ...


T = TypeVar("T", bound=Schedulable)
T_contra = TypeVar("T_contra", bound=Schedulable, contravariant=True)


class RecordBuffer(Protocol[T_contra]):
    """What a subscription's poll loop, settlement and rebalance need of its buffer."""

    size: int

    def add(self, item: T_contra) -> None: ...

    def release(self, item: T_contra) -> None: ...

    def requeue(self, item: T_contra) -> None: ...

    def drop_partition(self, partition: Hashable) -> int: ...

    def clear(self) -> None: ...


class KeyScheduler(Generic[T]):
    """Ready records in fetch order, plus per-key queues of records waiting for their key."""

    __slots__ = ("_busy", "_ready", "_waiting", "size")

    def __init__(self) -> None:
        self._ready: deque[T] = deque()
        self._waiting: dict[tuple[Hashable, Hashable], deque[T]] = {}
        # a key is busy while one of its records is ready or unsettled
        self._busy: set[tuple[Hashable, Hashable]] = set()
        self.size = 0
        """Records buffered (ready or waiting), not counting handed-out ones."""

    def add(self, item: T) -> None:
        """A record was fetched."""
        self.size += 1
        key = item.order_key
        if key is None:
            self._ready.append(item)
            return
        slot = (item.partition_key, key)
        if slot in self._busy:
            queue = self._waiting.get(slot)
            if queue is None:
                queue = self._waiting[slot] = deque()
            queue.append(item)
        else:
            self._busy.add(slot)
            self._ready.append(item)

    def pop(self) -> T | None:
        """The next record that may be handed out, or ``None``."""
        if not self._ready:
            return None
        self.size -= 1
        return self._ready.popleft()

    def release(self, item: T) -> None:
        """``item`` was settled for good: its key's next record becomes ready."""
        key = item.order_key
        if key is None:
            return
        slot = (item.partition_key, key)
        queue = self._waiting.get(slot)
        if queue:
            self._ready.append(queue.popleft())
            if not queue:
                del self._waiting[slot]
        else:
            self._busy.discard(slot)

    def requeue(self, item: T) -> None:
        """``item`` was given back: it is handed out again before anything else (its key stays busy)."""
        self.size += 1
        self._ready.appendleft(item)

    def drop_partition(self, partition: Hashable) -> int:
        """Forget every buffered record of ``partition`` (revoked); return how many."""
        before = len(self._ready)
        self._ready = deque(i for i in self._ready if i.partition_key != partition)
        dropped = before - len(self._ready)
        for slot in [s for s in self._waiting if s[0] == partition]:
            dropped += len(self._waiting.pop(slot))
        self._busy = {s for s in self._busy if s[0] != partition}
        self.size -= dropped
        return dropped

    def clear(self) -> None:
        """Forget everything (subscription stopped)."""
        self._ready.clear()
        self._waiting.clear()
        self._busy.clear()
        self.size = 0
