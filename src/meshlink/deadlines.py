"""One time limit for many waits, with a single event-loop timer.

Used where every entry gets the same limit (a handler's per-try timeout, a
producer's publish deadline): deadlines then arrive in the order entries are
made, so an insertion-ordered map is already sorted. Entering and leaving cost a
map insert and delete, where :func:`asyncio.timeout` pushes a timer on the
loop's heap and cancels it again for every entry.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar
from weakref import ref

__all__ = ["DeadlineLedger"]

T = TypeVar("T")


class DeadlineLedger(Generic[T]):
    """Entries of one loop, oldest first; ``on_expire(item)`` runs for each past its limit.

    The loop is referred to weakly, and the ledger keeps a flag rather than the
    timer's handle (a handle refers to its loop): an object that outlives a loop
    and keeps its ledger does not keep the loop alive.
    """

    __slots__ = ("_armed", "_entries", "_next", "_on_expire", "_seconds", "loop")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, seconds: float, on_expire: Callable[[T], object]
    ) -> None:
        self.loop = ref(loop)
        self._seconds = seconds
        self._on_expire = on_expire
        # token -> (deadline, item); insertion order is deadline order (one limit for all)
        self._entries: OrderedDict[int, tuple[float, T]] = OrderedDict()
        self._armed = False
        self._next = 0

    def __len__(self) -> int:
        """Entries not yet left and not yet expired."""
        return len(self._entries)

    def enter(self, item: T, loop: asyncio.AbstractEventLoop) -> int:
        """Start ``item``'s limit (``loop`` is this ledger's, running); returns its token."""
        token = self._next = self._next + 1
        deadline = loop.time() + self._seconds
        self._entries[token] = (deadline, item)
        if not self._armed:
            loop.call_at(deadline, self._fire)
            self._armed = True
        return token

    def leave(self, token: int) -> bool:
        """The entry ended; returns whether it had expired (``on_expire`` ran for it)."""
        return self._entries.pop(token, None) is None

    def _fire(self) -> None:
        """Expire every entry past its deadline; re-arm for the oldest one left."""
        self._armed = False
        loop = self.loop()
        if loop is None:  # pragma: no cover - a timer only runs on its live loop
            return
        now = loop.time()
        entries = self._entries
        while entries:
            token, (deadline, item) = next(iter(entries.items()))
            if deadline > now:
                loop.call_at(deadline, self._fire)
                self._armed = True
                return
            del entries[token]
            self._on_expire(item)
