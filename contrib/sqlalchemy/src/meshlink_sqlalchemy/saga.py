"""Saga state: one versioned row per saga, plus its history.

Deliberately small; the saga coordinator builds on it. Every change is an
optimistic update: it names the version it read, and fails with
:class:`StaleSagaError` if someone changed the saga since (the caller reloads
and decides again). Each change appends a history row. Every method takes an
optional ``session`` (``AsyncSession`` or ``AsyncConnection``) so that a state
change and the commands it causes (through the outbox) commit together;
without one it runs in its own transaction.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import insert, select
from sqlalchemy import update as sql_update
from sqlalchemy.ext.asyncio import AsyncEngine

from meshlink.clock import Clock, SystemClock
from meshlink.saga.store import StaleSagaError
from meshlink_sqlalchemy.tables import Tables

__all__ = ["SagaHistoryEntry", "SagaState", "SqlSagaStore", "StaleSagaError"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class SagaState:
    """A saga as stored."""

    saga_id: str
    name: str
    """The saga definition's name."""
    state: str
    """Where the saga is (the coordinator's vocabulary)."""
    data: Mapping[str, Any]
    """The saga's data (JSON)."""
    version: int
    """1 on creation, +1 per change."""
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class SagaHistoryEntry:
    """One change of a saga."""

    version: int
    state: str
    event: str
    """What caused the change."""
    data: Mapping[str, Any]
    at: float


class SqlSagaStore:
    """Saga state rows with optimistic versioning and history."""

    def __init__(self, engine: AsyncEngine, tables: Tables, *, clock: Clock | None = None) -> None:
        self.engine = engine
        self.tables = tables
        self.clock: Clock = clock or SystemClock()

    async def _in(self, session: Any, work: Callable[[Any], Awaitable[T]]) -> T:
        if session is not None:
            return await work(session)
        async with self.engine.begin() as conn:
            return await work(conn)

    async def create(
        self,
        saga_id: str,
        name: str,
        state: str,
        data: Mapping[str, Any],
        *,
        wake_at: float | None = None,
        session: Any = None,
    ) -> SagaState:
        """Store a new saga at version 1 (a duplicate ``saga_id`` raises the database's integrity error)."""
        now = self.clock.time()
        saga = SagaState(
            saga_id=saga_id,
            name=name,
            state=state,
            data=dict(data),
            version=1,
            created_at=now,
            updated_at=now,
        )

        async def work(conn: Any) -> SagaState:
            await conn.execute(
                insert(self.tables.saga).values(
                    saga_id=saga_id,
                    name=name,
                    state=state,
                    data=json.dumps(saga.data),
                    version=1,
                    created_at=now,
                    updated_at=now,
                    wake_at=wake_at,
                )
            )
            await self._history(conn, saga, "created")
            return saga

        return await self._in(session, work)

    async def update(
        self,
        saga: SagaState,
        *,
        state: str,
        data: Mapping[str, Any] | None = None,
        event: str,
        wake_at: float | None = None,
        session: Any = None,
    ) -> SagaState:
        """Move ``saga`` (as read) to ``state``; raises :class:`StaleSagaError` if it changed meanwhile."""
        now = self.clock.time()
        new = SagaState(
            saga_id=saga.saga_id,
            name=saga.name,
            state=state,
            data=dict(saga.data if data is None else data),
            version=saga.version + 1,
            created_at=saga.created_at,
            updated_at=now,
        )
        t = self.tables.saga

        async def work(conn: Any) -> SagaState:
            result = await conn.execute(
                sql_update(t)
                .where(t.c.saga_id == saga.saga_id, t.c.version == saga.version)
                .values(
                    state=state,
                    data=json.dumps(new.data),
                    version=new.version,
                    updated_at=now,
                    wake_at=wake_at,
                )
            )
            if result.rowcount != 1:
                raise StaleSagaError(
                    "saga changed since it was read", saga_id=saga.saga_id, version=saga.version
                )
            await self._history(conn, new, event)
            return new

        return await self._in(session, work)

    async def _history(self, conn: Any, saga: SagaState, event: str) -> None:
        await conn.execute(
            insert(self.tables.saga_history).values(
                saga_id=saga.saga_id,
                version=saga.version,
                state=saga.state,
                event=event,
                data=json.dumps(saga.data),
                at=saga.updated_at,
            )
        )

    async def load(self, saga_id: str, *, session: Any = None) -> SagaState | None:
        """The saga, or ``None``."""
        t = self.tables.saga

        async def work(conn: Any) -> SagaState | None:
            r = (await conn.execute(select(t).where(t.c.saga_id == saga_id))).first()
            return None if r is None else _state(r)

        return await self._in(session, work)

    async def find(
        self, *, name: str | None = None, state: str | None = None, limit: int = 100
    ) -> list[SagaState]:
        """Sagas, most recently changed first, optionally of one ``name`` and ``state``."""
        t = self.tables.saga
        query = select(t).order_by(t.c.updated_at.desc()).limit(limit)
        if name is not None:
            query = query.where(t.c.name == name)
        if state is not None:
            query = query.where(t.c.state == state)
        async with self.engine.connect() as conn:
            return [_state(r) for r in await conn.execute(query)]

    async def due(
        self, now: float, *, limit: int = 1000, states: Collection[str] | None = None
    ) -> list[SagaState]:
        """Sagas whose ``wake_at`` has come, earliest first (served by an index), optionally
        only in one of ``states`` (so that others never take up the ``limit``)."""
        t = self.tables.saga
        query = select(t).where(t.c.wake_at <= now).order_by(t.c.wake_at).limit(limit)
        if states is not None:
            query = query.where(t.c.state.in_(list(states)))
        async with self.engine.connect() as conn:
            return [_state(r) for r in await conn.execute(query)]

    async def history(self, saga_id: str) -> list[SagaHistoryEntry]:
        """Every change of the saga, oldest first."""
        h = self.tables.saga_history
        query = select(h).where(h.c.saga_id == saga_id).order_by(h.c.version)
        async with self.engine.connect() as conn:
            return [
                SagaHistoryEntry(
                    version=r.version, state=r.state, event=r.event, data=json.loads(r.data), at=r.at
                )
                for r in await conn.execute(query)
            ]


def _state(r: Any) -> SagaState:
    return SagaState(
        saga_id=r.saga_id,
        name=r.name,
        state=r.state,
        data=json.loads(r.data),
        version=r.version,
        created_at=r.created_at,
        updated_at=r.updated_at,
    )
