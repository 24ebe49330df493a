"""Which offset of a partition may be committed, given records settled out of order.

With handlers running concurrently, offset 7 can finish before offset 5. A
Kafka commit is a single position per partition ("everything before this is
done"), so the committable position is the first offset not yet settled. This
is hand-written because aiokafka only knows the *fetched* position, and
committing that (a bare ``commit()``) loses records still in flight.
"""

from __future__ import annotations

from collections import deque

__all__ = ["OffsetTracker"]


class OffsetTracker:
    """Offsets of one partition in fetch order, and the position that is safe to commit.

    Every record enters with :meth:`add` when it is fetched (in offset order) and
    leaves with :meth:`done` when it is acked or rejected. A nacked record is
    neither: it stays pending and holds the position back.
    """

    __slots__ = ("_done", "_high", "_pending", "_position")

    def __init__(self) -> None:
        self._pending: deque[int] = deque()
        self._done: set[int] = set()
        self._position: int | None = None
        self._high: int = -1

    def add(self, offset: int) -> None:
        """A record was fetched; offsets must arrive in increasing order."""
        if offset <= self._high:
            raise ValueError(f"offset {offset} not after {self._high}")
        self._high = offset
        if not self._pending and self._position is None:
            self._position = offset
        self._pending.append(offset)

    def add_run(self, offsets: list[int]) -> None:
        """:meth:`add` for records fetched together (increasing offsets, as a fetch returns them)."""
        if not offsets:
            return
        if offsets[0] <= self._high or offsets[-1] < offsets[0]:
            raise ValueError(f"offsets {offsets[0]}..{offsets[-1]} not after {self._high}")
        self._high = offsets[-1]
        if not self._pending and self._position is None:
            self._position = offsets[0]
        self._pending.extend(offsets)

    def done(self, offset: int) -> None:
        """A record was settled for good (ack or reject)."""
        pending = self._pending
        if pending and pending[0] == offset:
            pending.popleft()
            while pending and pending[0] in self._done:
                self._done.discard(pending.popleft())
        else:
            self._done.add(offset)
        self._position = pending[0] if pending else self._high + 1

    @property
    def position(self) -> int | None:
        """The offset to commit: everything before it is settled (``None`` before any fetch)."""
        return self._position

    def done_ahead(self) -> frozenset[int]:
        """Offsets settled for good after :attr:`position` (held back by an earlier one)."""
        return frozenset(self._done)

    @property
    def pending(self) -> int:
        """Records fetched and not yet settled for good."""
        return len(self._pending) - len(self._done)
