"""Saga instances and where they are kept.

A :class:`SagaInstance` is everything the coordinator needs to resume a saga
after a crash: its state, which step it is at, whether it waits for a reply
(and until when), and its history. :meth:`SagaStore.save` writes an instance
*and the commands its transition sends* atomically, under an optimistic version
check, so two coordinators never both advance one saga and a crash never leaves
a state change without its commands (or the reverse). The SQL store in
``meshlink-sqlalchemy`` writes the commands to the outbox in the same
transaction; :class:`MemorySagaStore` publishes them after saving and is meant
for tests and single-process use.
"""

from __future__ import annotations

import asyncio
import builtins
import enum
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from meshlink.errors import MeshlinkError
from meshlink.message import Message

__all__ = [
    "HistoryEntry",
    "MemorySagaStore",
    "SagaInstance",
    "SagaStatus",
    "SagaStore",
    "StaleSagaError",
]


class SagaStatus(enum.StrEnum):
    """Where a saga is in its life."""

    RUNNING = "running"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    COMPENSATED = "compensated"
    FAILED = "failed"
    """A compensation kept failing: parked for an operator."""

    @property
    def finished(self) -> bool:
        return self in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED)


@dataclass(frozen=True, slots=True, kw_only=True)
class HistoryEntry:
    """One thing that happened to a saga."""

    at: float
    step: str
    event: str
    """``started``, ``sent``, ``succeeded``, ``failed``, ``timed-out``, ``compensated``,
    ``compensation-failed``, ``ignored-reply``, ``completed``…"""
    attempt: int = 1
    detail: str = ""


@dataclass(frozen=True, kw_only=True)
class SagaInstance:
    """A saga in flight (immutable; the coordinator saves changed copies)."""

    saga_id: str
    name: str
    definition_version: int
    status: SagaStatus
    state: dict[str, Any]
    step: int
    """Index of the current step (forward), or of the step being compensated."""
    waiting: bool = False
    """A remote step's command is out and its reply awaited."""
    token: str = ""
    """Identifies the awaited reply (a late reply to an earlier try is ignored)."""
    due_at: float | None = None
    """Wall time the awaited reply times out."""
    wake_at: float | None = None
    """When the coordinators' sweep must look at it (a timeout, or a stall); ``None`` when finished."""
    completed: tuple[int, ...] = ()
    """Indexes of the steps that succeeded, in order (compensated in reverse)."""
    history: tuple[HistoryEntry, ...] = ()
    version: int = 0
    """Bumped by every save; a save with a stale version fails."""
    created_at: float = 0.0
    updated_at: float = 0.0

    def evolve(self, **changes: Any) -> SagaInstance:
        """A copy with ``changes``."""
        return replace(self, **changes)

    def log(self, at: float, step: str, event: str, *, attempt: int = 1, detail: str = "") -> SagaInstance:
        """A copy with one more history entry."""
        entry = HistoryEntry(at=at, step=step, event=event, attempt=attempt, detail=detail)
        return replace(self, history=(*self.history, entry))


class StaleSagaError(MeshlinkError):
    """The saga was saved by someone else since it was loaded. Reload and try again."""


Outgoing = tuple[str, Message]
"""``(destination, message)`` a transition sends."""


@runtime_checkable
class SagaStore(Protocol):
    """Keeps saga instances. Every method is atomic."""

    async def save(self, instance: SagaInstance, outgoing: Sequence[Outgoing] = ()) -> SagaInstance:
        """Insert or update ``instance`` if its version still matches, with its commands.

        Returns the saved instance (version + 1). Raises StaleSagaError otherwise.
        """
        ...

    async def load(self, saga_id: str) -> SagaInstance | None:
        """The instance with ``saga_id``, if any."""
        ...

    async def find(self, status: SagaStatus | None = None, limit: int = 100) -> builtins.list[SagaInstance]:
        """Instances, newest first, optionally of one status."""
        ...

    async def unfinished(self) -> builtins.list[SagaInstance]:
        """Every instance still running or compensating (to resume after a restart)."""
        ...

    async def due(self, now: float, limit: int = 1000) -> builtins.list[SagaInstance]:
        """Unfinished instances whose ``wake_at`` has come (an indexed query on SQL)."""
        ...


@dataclass
class MemorySagaStore:
    """An in-process store. Commands are published after the save (not atomically):
    use the SQL store where a crash must not separate the two."""

    publish: Callable[[str, Message], Awaitable[None]] | None = None
    """How saved commands are sent (the coordinator sets it to its transport)."""
    instances: dict[str, SagaInstance] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def save(self, instance: SagaInstance, outgoing: Sequence[Outgoing] = ()) -> SagaInstance:
        async with self._lock:
            current = self.instances.get(instance.saga_id)
            if (current.version if current else 0) != instance.version:
                raise StaleSagaError("saga changed since it was loaded", saga_id=instance.saga_id)
            saved = instance.evolve(version=instance.version + 1)
            self.instances[instance.saga_id] = saved
        for destination, message in outgoing:
            if self.publish is not None:
                await self.publish(destination, message)
        return saved

    async def load(self, saga_id: str) -> SagaInstance | None:
        return self.instances.get(saga_id)

    async def find(self, status: SagaStatus | None = None, limit: int = 100) -> builtins.list[SagaInstance]:
        found = [i for i in self.instances.values() if status is None or i.status == status]
        return sorted(found, key=lambda i: i.created_at, reverse=True)[:limit]

    async def unfinished(self) -> builtins.list[SagaInstance]:
        return [i for i in self.instances.values() if not i.status.finished]

    async def due(self, now: float, limit: int = 1000) -> builtins.list[SagaInstance]:
        found = [
            i
            for i in self.instances.values()
            if not i.status.finished and i.wake_at is not None and i.wake_at <= now
        ]
        return sorted(found, key=lambda i: i.wake_at or 0.0)[:limit]
