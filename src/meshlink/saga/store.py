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

:meth:`SagaStore.save_many` saves the transitions of several sagas at once (the
coordinator's group commit): each keeps its own version check and succeeds or
goes stale on its own, and the successful ones commit together.
"""

from __future__ import annotations

import asyncio
import builtins
import enum
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, runtime_checkable

import structlog

from meshlink.errors import MeshlinkError
from meshlink.message import Message

__all__ = [
    "HistoryEntry",
    "MemorySagaStore",
    "SagaInstance",
    "SagaStatus",
    "SagaStore",
    "Saved",
    "StaleSagaError",
    "Transition",
]

_log = structlog.get_logger("meshlink.saga")


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
        """A copy with ``changes`` (a plain copy of the fields: the coordinator makes many)."""
        unknown = changes.keys() - _INSTANCE_FIELDS
        if unknown:
            raise TypeError(f"SagaInstance has no field(s) {sorted(unknown)}")
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        copy.__dict__.update(changes)
        return copy

    def log(self, at: float, step: str, event: str, *, attempt: int = 1, detail: str = "") -> SagaInstance:
        """A copy with one more history entry."""
        entry = HistoryEntry(at=at, step=step, event=event, attempt=attempt, detail=detail)
        return self.evolve(history=(*self.history, entry))


_INSTANCE_FIELDS = frozenset(f.name for f in fields(SagaInstance))


class StaleSagaError(MeshlinkError):
    """The saga was saved by someone else since it was loaded. Reload and try again."""


Outgoing = tuple[str, Message]
"""``(destination, message)`` a transition sends."""

Transition = tuple[SagaInstance, Sequence[Outgoing]]
"""A saga instance to save and the commands its transition sends."""

Saved = SagaInstance | StaleSagaError
"""What :meth:`SagaStore.save_many` answers per transition: the saved instance, or why not."""


@runtime_checkable
class SagaStore(Protocol):
    """Keeps saga instances. Every method is atomic."""

    async def save(self, instance: SagaInstance, outgoing: Sequence[Outgoing] = ()) -> SagaInstance:
        """Insert or update ``instance`` if its version still matches, with its commands.

        Returns the saved instance (version + 1). Raises StaleSagaError otherwise.
        """
        ...

    async def save_many(
        self, transitions: Sequence[Transition]
    ) -> builtins.list[SagaInstance | StaleSagaError]:
        """Save several sagas' transitions at once, each under its own version check.

        Returns, in order, each saved instance or the :class:`StaleSagaError` that
        refused it; the refused ones change nothing and the others are saved (with
        their commands) in one transaction. The saga ids must be distinct. Any
        other error means nothing was saved.
        """
        ...

    async def load(self, saga_id: str) -> SagaInstance | None:
        """The instance with ``saga_id``, if any."""
        ...

    async def find(self, status: SagaStatus | None = None, limit: int = 100) -> builtins.list[SagaInstance]:
        """Instances, most recently changed first, optionally of one status."""
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
        (result,) = await self.save_many([(instance, outgoing)])
        if isinstance(result, StaleSagaError):
            raise result
        return result

    async def save_many(
        self, transitions: Sequence[Transition]
    ) -> builtins.list[SagaInstance | StaleSagaError]:
        _distinct(transitions)
        results: list[Saved] = []
        sends: list[Outgoing] = []
        async with self._lock:
            for instance, outgoing in transitions:
                current = self.instances.get(instance.saga_id)
                if (current.version if current else 0) != instance.version:
                    results.append(
                        StaleSagaError("saga changed since it was loaded", saga_id=instance.saga_id)
                    )
                    continue
                saved = instance.evolve(version=instance.version + 1)
                self.instances[instance.saga_id] = saved
                results.append(saved)
                sends.extend(outgoing)
        for destination, message in sends:
            if self.publish is not None:
                try:
                    await self.publish(destination, message)
                except Exception as exc:
                    # every transition is saved: one command that cannot be sent must not fail
                    # the others (not atomic here; the SQL store writes commands in its outbox)
                    _log.error(
                        "saga command could not be published", destination=destination, error=repr(exc)
                    )
        return results

    async def load(self, saga_id: str) -> SagaInstance | None:
        return self.instances.get(saga_id)

    async def find(self, status: SagaStatus | None = None, limit: int = 100) -> builtins.list[SagaInstance]:
        found = [i for i in self.instances.values() if status is None or i.status == status]
        return sorted(found, key=lambda i: (i.updated_at, i.created_at), reverse=True)[:limit]

    async def unfinished(self) -> builtins.list[SagaInstance]:
        return [i for i in self.instances.values() if not i.status.finished]

    async def due(self, now: float, limit: int = 1000) -> builtins.list[SagaInstance]:
        found = [
            i
            for i in self.instances.values()
            if not i.status.finished and i.wake_at is not None and i.wake_at <= now
        ]
        return sorted(found, key=lambda i: i.wake_at or 0.0)[:limit]


def _distinct(transitions: Sequence[Transition]) -> None:
    ids = {instance.saga_id for instance, _ in transitions}
    if len(ids) != len(transitions):
        raise ValueError("save_many: one saga appears twice in the batch")
