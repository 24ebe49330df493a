"""The saga coordinator's store on SQL: instance, history and commands in one transaction.

Implements :class:`meshlink.saga.SagaStore` on the saga tables of
:class:`SqlStores`. A :meth:`~SqlSagaInstanceStore.save_many` (the coordinator's
group commit) is one database transaction for a whole batch of transitions:

* the updates, each under its optimistic version check — PostgreSQL: the rows are
  locked in ``saga_id`` order (two replicas' batches do not deadlock on them), then one
  ``UPDATE … FROM unnest(…) … RETURNING`` says which versions matched; SQLite (one
  writer at a time): one ``executemany``, and if its row count shows a stale one,
  the transaction is rolled back and redone row by row to find it;
* the new sagas: one ``INSERT … ON CONFLICT DO NOTHING RETURNING`` (an id that
  exists is stale: starting is idempotent);
* one history row per saved transition and the commands of all of them (the
  transactional outbox), each one multi-row insert.

A crash can never leave a state change without its commands, or the reverse. The
instance is serialised once per save (the same JSON text goes to the saga row and
its history row). The relay publishes the commands; pass its :meth:`~meshlink.outbox.Relay.wake`
as ``wake`` so it claims them right after the commit instead of at its next poll::

    stores = SqlStores("postgresql+asyncpg://app@db/app")
    relay = Relay(stores.outbox).attach(mesh)
    coordinator = SagaCoordinator(mesh, [checkout], store=SqlSagaInstanceStore(stores, wake=relay.wake))
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import ARRAY, Double, Integer, String, Text, any_, bindparam, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from meshlink.errors import ConfigurationError
from meshlink.outbox.store import OutboxEntry
from meshlink.outbox.writer import Outbox
from meshlink.saga.store import (
    HistoryEntry,
    Outgoing,
    SagaInstance,
    SagaStatus,
    Saved,
    StaleSagaError,
    Transition,
)
from meshlink_sqlalchemy.stores import SqlStores

__all__ = ["SqlSagaInstanceStore"]


class _Stale(Exception):
    """SQLite's batched update matched fewer rows than it had: redo the batch row by row."""


class SqlSagaInstanceStore:
    """A :class:`~meshlink.saga.SagaStore` on SQLite or PostgreSQL.

    Args:
        stores: the SQL stores (their engine, saga tables and outbox).
        source: the ``ce_source`` of messages built by :attr:`outbox`.
        wake: called after a transaction that wrote commands commits (a relay's ``wake``).
    """

    def __init__(
        self, stores: SqlStores, *, source: str = "meshlink.saga", wake: Callable[[], None] | None = None
    ) -> None:
        self.stores = stores
        self.outbox = Outbox(stores.outbox, source=source)
        self.wake = wake
        self.postgres = stores.engine.dialect.name == "postgresql"
        t, h = stores.tables.saga, stores.tables.saga_history
        dialect_insert = postgresql.insert if self.postgres else sqlite.insert
        self._create = (
            dialect_insert(t).on_conflict_do_nothing(index_elements=[t.c.saga_id]).returning(t.c.saga_id)
        )
        self._history = insert(h)
        self._load = select(t).where(t.c.saga_id == bindparam("sid"))
        self._update_one = (
            update(t)
            .where(t.c.saga_id == bindparam("b_id"), t.c.version == bindparam("b_version"))
            .values(
                state=bindparam("b_state"),
                data=bindparam("b_data"),
                version=bindparam("b_version") + 1,
                updated_at=bindparam("b_updated_at"),
                wake_at=bindparam("b_wake_at"),
            )
        )
        self._lock = (
            select(t.c.saga_id)
            .where(t.c.saga_id == any_(bindparam("ids", type_=ARRAY(String))))
            .order_by(t.c.saga_id)
            .with_for_update()
        )
        v = select(
            func.unnest(bindparam("ids", type_=ARRAY(String)), type_=String).label("saga_id"),
            func.unnest(bindparam("versions", type_=ARRAY(Integer)), type_=Integer).label("version"),
            func.unnest(bindparam("states", type_=ARRAY(String)), type_=String).label("state"),
            func.unnest(bindparam("datas", type_=ARRAY(Text)), type_=Text).label("data"),
            func.unnest(bindparam("updated", type_=ARRAY(Double)), type_=Double).label("updated_at"),
            func.unnest(bindparam("wakes", type_=ARRAY(Double)), type_=Double).label("wake_at"),
        ).subquery("v")
        self._update_pg = (
            update(t)
            .where(t.c.saga_id == v.c.saga_id, t.c.version == v.c.version)
            .values(
                state=v.c.state,
                data=v.c.data,
                version=v.c.version + 1,
                updated_at=v.c.updated_at,
                wake_at=v.c.wake_at,
            )
            .returning(t.c.saga_id)
        )

    # -- writing ------------------------------------------------------------------------------

    async def save(self, instance: SagaInstance, outgoing: Sequence[Outgoing] = ()) -> SagaInstance:
        (result,) = await self.save_many([(instance, outgoing)])
        if isinstance(result, StaleSagaError):
            raise result
        return result

    async def save_many(self, transitions: Sequence[Transition]) -> builtins.list[Saved]:
        if len({i.saga_id for i, _ in transitions}) != len(transitions):
            raise ValueError("save_many: one saga appears twice in the batch")
        for _, outgoing in transitions:
            if any(not destination for destination, _ in outgoing):
                raise ConfigurationError("destination", "must be a non-empty string")
        rows = [_Row(instance, outgoing) for instance, outgoing in transitions]
        rows.sort(key=lambda r: r.instance.saga_id)  # one lock order for every writer
        try:
            async with self.stores.engine.begin() as conn:
                saved = await self._write(conn, rows, row_by_row=False)
        except _Stale:
            async with self.stores.engine.begin() as conn:
                saved = await self._write(conn, rows, row_by_row=True)
        if self.wake is not None and any(r.outgoing for r in rows if r.instance.saga_id in saved):
            self.wake()
        results: list[Saved] = []
        for instance, _ in transitions:
            if instance.saga_id in saved:
                results.append(instance.evolve(version=instance.version + 1))
            else:
                results.append(StaleSagaError("saga changed since it was loaded", saga_id=instance.saga_id))
        return results

    async def _write(self, conn: Any, rows: list[_Row], *, row_by_row: bool) -> set[str]:
        """Write the batch in ``conn``'s transaction; the ids of the sagas saved."""
        saved: set[str] = set()
        updates = [r for r in rows if r.instance.version > 0]
        if updates and self.postgres:
            ids = [r.instance.saga_id for r in updates]
            await conn.execute(self._lock, {"ids": ids})
            params = {
                "ids": ids,
                "versions": [r.instance.version for r in updates],
                "states": [r.instance.status.value for r in updates],
                "datas": [r.data for r in updates],
                "updated": [r.instance.updated_at for r in updates],
                "wakes": [r.instance.wake_at for r in updates],
            }
            saved.update((await conn.execute(self._update_pg, params)).scalars())
        elif updates and not row_by_row:
            result = await conn.execute(self._update_one, [r.update_params() for r in updates])
            if result.rowcount != len(updates):
                raise _Stale()
            saved.update(r.instance.saga_id for r in updates)
        else:
            for r in updates:
                if (await conn.execute(self._update_one, r.update_params())).rowcount == 1:
                    saved.add(r.instance.saga_id)
        creates = [r.create_params() for r in rows if r.instance.version == 0]
        if creates:
            saved.update((await conn.execute(self._create, creates)).scalars())
        done = [r for r in rows if r.instance.saga_id in saved]
        if done:
            await conn.execute(self._history, [r.history_params() for r in done])
        now = self.stores.sagas.clock.time()
        entries = [
            OutboxEntry(destination=destination, message=message, created_at=now)
            for r in done
            for destination, message in r.outgoing
        ]
        if entries:
            await self.stores.outbox.add(conn, entries)
        return saved

    # -- reading ------------------------------------------------------------------------------

    async def load(self, saga_id: str) -> SagaInstance | None:
        async with self.stores.engine.connect() as conn:
            row = (await conn.execute(self._load, {"sid": saga_id})).first()
        return None if row is None else _instance(row, json.loads(row.data))

    async def find(self, status: SagaStatus | None = None, limit: int = 100) -> builtins.list[SagaInstance]:
        rows = await self.stores.sagas.find(state=status.value if status else None, limit=limit)
        return [_instance(r, r.data) for r in rows]

    async def due(self, now: float, limit: int = 1000) -> builtins.list[SagaInstance]:
        unfinished = (SagaStatus.RUNNING.value, SagaStatus.COMPENSATING.value)
        return [
            _instance(r, r.data) for r in await self.stores.sagas.due(now, limit=limit, states=unfinished)
        ]

    async def unfinished(self) -> builtins.list[SagaInstance]:
        found: list[SagaInstance] = []
        for status in (SagaStatus.RUNNING, SagaStatus.COMPENSATING):
            found.extend(await self.find(status, limit=1_000_000))
        return found


class _Row:
    """One transition, serialised once."""

    __slots__ = ("data", "instance", "outgoing")

    def __init__(self, instance: SagaInstance, outgoing: Sequence[Outgoing]) -> None:
        self.instance = instance
        self.outgoing = outgoing
        self.data = json.dumps(_dump(instance), separators=(",", ":"))

    def update_params(self) -> dict[str, Any]:
        i = self.instance
        return {
            "b_id": i.saga_id,
            "b_version": i.version,
            "b_state": i.status.value,
            "b_data": self.data,
            "b_updated_at": i.updated_at,
            "b_wake_at": i.wake_at,
        }

    def create_params(self) -> dict[str, Any]:
        i = self.instance
        return {
            "saga_id": i.saga_id,
            "name": i.name,
            "state": i.status.value,
            "data": self.data,
            "version": 1,
            "created_at": i.created_at,
            "updated_at": i.updated_at,
            "wake_at": i.wake_at,
        }

    def history_params(self) -> dict[str, Any]:
        i = self.instance
        return {
            "saga_id": i.saga_id,
            "version": i.version + 1,
            "state": i.status.value,
            "event": i.history[-1].event if i.history else "saved",
            "data": self.data,
            "at": i.updated_at,
        }


def _dump(instance: SagaInstance) -> dict[str, Any]:
    return {
        "definition_version": instance.definition_version,
        "state": instance.state,
        "step": instance.step,
        "waiting": instance.waiting,
        "token": instance.token,
        "due_at": instance.due_at,
        "wake_at": instance.wake_at,
        "completed": list(instance.completed),
        "history": [
            {"at": h.at, "step": h.step, "event": h.event, "attempt": h.attempt, "detail": h.detail}
            for h in instance.history
        ],
    }


def _instance(r: Any, d: Any) -> SagaInstance:
    """An instance from a saga row (or :class:`SagaState`) ``r`` and its parsed data ``d``."""
    return SagaInstance(
        saga_id=r.saga_id,
        name=r.name,
        definition_version=int(d["definition_version"]),
        status=SagaStatus(r.state),
        state=dict(d["state"]),
        step=int(d["step"]),
        waiting=bool(d["waiting"]),
        token=str(d["token"]),
        due_at=d["due_at"],
        wake_at=d.get("wake_at"),
        completed=tuple(d["completed"]),
        history=tuple(HistoryEntry(**h) for h in d["history"]),
        version=r.version,
        created_at=r.created_at,
        updated_at=r.updated_at,
    )
