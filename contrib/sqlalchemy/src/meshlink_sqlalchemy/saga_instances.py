"""The saga coordinator's store on SQL: instance, history and commands in one transaction.

Implements :class:`meshlink.saga.SagaStore` on top of :class:`SqlSagaStore`'s
versioned rows. Each :meth:`save` is one database transaction holding the new
version of the saga row (optimistic check), a history row, and the commands the
transition sends, written to the transactional outbox — so a coordinator crash
can never leave a state change without its commands, or the reverse. The relay
publishes the commands; attach one to the coordinator's mesh::

    stores = SqlStores("postgresql+asyncpg://app@db/app")
    coordinator = SagaCoordinator(mesh, [checkout], store=SqlSagaInstanceStore(stores))
    Relay(stores.outbox).attach(mesh)
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.exc import IntegrityError

from meshlink.outbox.writer import Outbox
from meshlink.saga.store import HistoryEntry, Outgoing, SagaInstance, SagaStatus, StaleSagaError
from meshlink_sqlalchemy.saga import SagaState
from meshlink_sqlalchemy.stores import SqlStores

__all__ = ["SqlSagaInstanceStore"]

_ROW_FIELDS = ("saga_id", "name", "status", "version", "created_at", "updated_at")


class SqlSagaInstanceStore:
    """A :class:`~meshlink.saga.SagaStore` on SQLite or PostgreSQL."""

    def __init__(self, stores: SqlStores, *, source: str = "meshlink.saga") -> None:
        self.stores = stores
        self.outbox = Outbox(stores.outbox, source=source)

    async def save(self, instance: SagaInstance, outgoing: Sequence[Outgoing] = ()) -> SagaInstance:
        data = _dump(instance)
        event = instance.history[-1].event if instance.history else "saved"
        sagas = self.stores.sagas
        try:
            async with self.stores.engine.begin() as conn:
                if instance.version == 0:
                    row = await sagas.create(
                        instance.saga_id,
                        instance.name,
                        instance.status.value,
                        data,
                        wake_at=instance.wake_at,
                        session=conn,
                    )
                else:
                    current = SagaState(
                        saga_id=instance.saga_id,
                        name=instance.name,
                        state=instance.status.value,
                        data=data,
                        version=instance.version,
                        created_at=instance.created_at,
                        updated_at=instance.updated_at,
                    )
                    row = await sagas.update(
                        current,
                        state=instance.status.value,
                        data=data,
                        event=event,
                        wake_at=instance.wake_at,
                        session=conn,
                    )
                for destination, message in outgoing:
                    await self.outbox.add(conn, destination, message)
        except IntegrityError as exc:  # another coordinator created it first
            raise StaleSagaError("saga was created concurrently", saga_id=instance.saga_id) from exc
        return instance.evolve(version=row.version)

    async def load(self, saga_id: str) -> SagaInstance | None:
        row = await self.stores.sagas.load(saga_id)
        return None if row is None else _instance(row)

    async def find(self, status: SagaStatus | None = None, limit: int = 100) -> builtins.list[SagaInstance]:
        rows = await self.stores.sagas.find(state=status.value if status else None, limit=limit)
        return [_instance(r) for r in rows]

    async def due(self, now: float, limit: int = 1000) -> builtins.list[SagaInstance]:
        return [_instance(r) for r in await self.stores.sagas.due(now, limit=limit)]

    async def unfinished(self) -> builtins.list[SagaInstance]:
        found: list[SagaInstance] = []
        for status in (SagaStatus.RUNNING, SagaStatus.COMPENSATING):
            found.extend(await self.find(status, limit=1_000_000))
        return found


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


def _instance(row: SagaState) -> SagaInstance:
    d: Mapping[str, Any] = row.data
    return SagaInstance(
        saga_id=row.saga_id,
        name=row.name,
        definition_version=int(d["definition_version"]),
        status=SagaStatus(row.state),
        state=dict(d["state"]),
        step=int(d["step"]),
        waiting=bool(d["waiting"]),
        token=str(d["token"]),
        due_at=d["due_at"],
        wake_at=d.get("wake_at"),
        completed=tuple(d["completed"]),
        history=tuple(HistoryEntry(**h) for h in d["history"]),
        version=row.version,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )
