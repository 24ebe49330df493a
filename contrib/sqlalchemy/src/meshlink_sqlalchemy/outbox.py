"""The SQL outbox store (SQLAlchemy 2 async Core), on PostgreSQL and SQLite.

Claiming is one statement (a CTE plus ``UPDATE … RETURNING``)::

    WITH heads AS (            -- claimable rows that are their key's earliest unsent row
        SELECT id, msg_key FROM outbox
        WHERE sent_at IS NULL AND <lease free or ours> AND <retry due>
          AND (msg_key IS NULL OR id IN (SELECT min(id) … WHERE sent_at IS NULL GROUP BY msg_key))
        ORDER BY id LIMIT :n
        FOR UPDATE SKIP LOCKED)                 -- PostgreSQL; SQLite runs statements one at a time
    UPDATE outbox SET claimed_by = :relay, lease_until = :now + :lease
    WHERE id IN (SELECT id FROM outbox WHERE sent_at IS NULL
                 AND (id IN heads OR msg_key IN heads.msg_key) ORDER BY id LIMIT :n)
    RETURNING …

A relay gets a key's rows only through the key's head, which it must lock (a
concurrent claimer skips a locked head and so the whole key) and which stays
leased while the relay works. So two relays never hold rows of one key, and the
holder has a prefix of the key's rows. Settling statements (``mark_sent``,
``release``) are single autocommit statements; each operation is retried on
connection-class errors (a terminated backend, a restart), which is safe
because each is idempotent for the relay that holds the rows.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Double,
    Select,
    Table,
    and_,
    any_,
    bindparam,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
)
from sqlalchemy import update as sql_update
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from meshlink.outbox.store import FailedRow, OutboxEntry, OutboxRow, OutboxStats, RowFailure, Watch
from meshlink_sqlalchemy.engine import with_retry
from meshlink_sqlalchemy.listen import NoWatch, PgWatch
from meshlink_sqlalchemy.tables import Tables

__all__ = ["SqlOutboxStore"]


class SqlOutboxStore:
    """An :class:`~meshlink.outbox.OutboxStore` in a SQL database.

    Args:
        engine: the async engine (``postgresql+asyncpg`` or ``sqlite+aiosqlite``).
        tables: the tables to use (:func:`~meshlink_sqlalchemy.tables.build_tables`).
    """

    def __init__(self, engine: AsyncEngine, tables: Tables) -> None:
        self.engine = engine
        self.tables = tables
        self.postgres = engine.dialect.name == "postgresql"
        self._auto = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._t = tables.outbox

    def _ids_match(self, ids: Sequence[int]) -> ColumnElement[bool]:
        if self.postgres:  # one array parameter: the same prepared statement whatever the count
            return self._t.c.id == any_(bindparam("ids", list(ids), type_=ARRAY(BigInteger)))
        return self._t.c.id.in_(list(ids))

    # -- writing ------------------------------------------------------------------------

    async def add(self, session: Any, entries: Sequence[OutboxEntry]) -> None:
        """Insert ``entries`` through ``session`` (``AsyncSession`` or ``AsyncConnection``), uncommitted."""
        rows = [
            {
                "destination": e.destination,
                "msg_key": e.message.key,
                "headers": json.dumps(e.message.to_headers(), separators=(",", ":")),
                "body": e.message.body,
                "created_at": e.created_at,
                "deliver_at": e.deliver_at,
            }
            for e in entries
        ]
        if rows:
            await session.execute(insert(self._t), rows)

    # -- the relay's operations ----------------------------------------------------------

    def _claim_statement(self, relay: str, limit: int, lease: float, now: float) -> Any:
        t, now = self._t, float(now)
        first = t.alias("first")
        free = or_(t.c.lease_until.is_(None), t.c.lease_until < now, t.c.claimed_by == relay)
        due = or_(t.c.retry_at.is_(None), t.c.retry_at <= now)
        # each key's earliest unsent row: one pass over the (msg_key, id) index of unsent rows
        key_heads = (
            select(func.min(first.c.id))
            .where(first.c.sent_at.is_(None), first.c.msg_key.is_not(None))
            .group_by(first.c.msg_key)
        )
        heads = (
            select(t.c.id, t.c.msg_key)
            .where(t.c.sent_at.is_(None), free, due, or_(t.c.msg_key.is_(None), t.c.id.in_(key_heads)))
            .order_by(t.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True, of=t)
            .cte("heads")
        )
        mine = t.alias("mine")
        picked: Select[Any] = (
            select(mine.c.id)
            .where(
                mine.c.sent_at.is_(None),
                or_(
                    mine.c.id.in_(select(heads.c.id)),
                    mine.c.msg_key.in_(select(heads.c.msg_key).where(heads.c.msg_key.is_not(None))),
                ),
            )
            .order_by(mine.c.id)
            .limit(limit)
        )
        return (
            sql_update(t)
            .where(t.c.id.in_(picked))
            .values(claimed_by=relay, lease_until=now + lease)
            .returning(*_row_columns(t))
        )

    async def claim(self, relay: str, *, limit: int, lease: float, now: float) -> list[OutboxRow]:
        statement = self._claim_statement(relay, limit, lease, now)

        async def run() -> list[OutboxRow]:
            async with self._auto.connect() as conn:
                result = await conn.execute(statement)
                return sorted((_row(r) for r in result), key=lambda r: r.id)

        return await with_retry(run)

    async def _autocommit(self, statement: Any) -> int:
        async def run() -> int:
            async with self._auto.connect() as conn:
                result = await conn.execute(statement)
                return int(result.rowcount)

        return await with_retry(run)

    async def mark_sent(self, relay: str, ids: Sequence[int], *, now: float) -> int:
        if not ids:
            return 0
        t = self._t
        return await self._autocommit(
            sql_update(t)
            .where(self._ids_match(ids), t.c.claimed_by == relay, t.c.sent_at.is_(None))
            .values(sent_at=now, claimed_by=None, lease_until=None)
        )

    async def release(self, relay: str, ids: Sequence[int]) -> None:
        if not ids:
            return
        t = self._t
        await self._autocommit(
            sql_update(t)
            .where(self._ids_match(ids), t.c.claimed_by == relay, t.c.sent_at.is_(None))
            .values(claimed_by=None, lease_until=None)
        )

    async def record_failure(
        self, relay: str, failures: Sequence[RowFailure], *, now: float, max_attempts: int
    ) -> list[int]:
        t, failed = self._t, self.tables.outbox_failed

        async def run() -> list[int]:
            moved: list[int] = []
            async with self.engine.begin() as conn:
                for f in failures:  # rare path: one statement per failed row is fine
                    result = await conn.execute(
                        sql_update(t)
                        .where(t.c.id == f.id, t.c.claimed_by == relay, t.c.sent_at.is_(None))
                        .values(
                            attempts=t.c.attempts + 1,
                            last_error=f.reason,
                            retry_at=f.retry_at,
                            claimed_by=None,
                            lease_until=None,
                        )
                        .returning(t.c.attempts)
                    )
                    attempts = result.scalar()
                    if attempts is not None and (f.permanent or attempts >= max_attempts):
                        moved.append(f.id)
                if moved:
                    cols = [
                        t.c.id,
                        t.c.destination,
                        t.c.msg_key,
                        t.c.headers,
                        t.c.body,
                        t.c.created_at,
                        t.c.attempts,
                    ]
                    source = select(*cols, t.c.last_error, literal(now, Double())).where(t.c.id.in_(moved))
                    names = ["id", "destination", "msg_key", "headers", "body", "created_at", "attempts"]
                    await conn.execute(insert(failed).from_select([*names, "reason", "failed_at"], source))
                    await conn.execute(delete(t).where(t.c.id.in_(moved)))
            return moved

        return await with_retry(run)

    async def purge(self, *, sent_before: float, limit: int = 10_000) -> int:
        t = self._t
        old = select(t.c.id).where(t.c.sent_at.is_not(None), t.c.sent_at < sent_before).limit(limit)
        return await self._autocommit(delete(t).where(t.c.id.in_(old)))

    async def stats(self, *, now: float) -> OutboxStats:
        t = self._t
        unsent = t.c.sent_at.is_(None)
        query = select(
            func.count().filter(unsent),
            func.count().filter(and_(unsent, t.c.lease_until >= now)),
            func.count().filter(and_(unsent, t.c.retry_at > now)),
            func.count().filter(t.c.sent_at.is_not(None)),
            func.min(t.c.created_at).filter(unsent),
        )

        async def run() -> OutboxStats:
            async with self._auto.connect() as conn:
                pending, in_flight, retrying, sent, oldest = (await conn.execute(query)).one()
                failed = (
                    await conn.execute(select(func.count()).select_from(self.tables.outbox_failed))
                ).scalar()
            return OutboxStats(
                pending=pending,
                in_flight=in_flight,
                retrying=retrying,
                sent=sent,
                failed=int(failed or 0),
                oldest_pending_at=oldest,
                now=now,
            )

        return await with_retry(run)

    async def list_pending(self, *, limit: int = 100) -> list[OutboxRow]:
        t = self._t
        query = select(*_row_columns(t)).where(t.c.sent_at.is_(None)).order_by(t.c.id).limit(limit)

        async def run() -> list[OutboxRow]:
            async with self._auto.connect() as conn:
                return [_row(r) for r in await conn.execute(query)]

        return await with_retry(run)

    async def list_failed(self, *, limit: int = 100) -> list[FailedRow]:
        f = self.tables.outbox_failed
        query = select(f).order_by(f.c.failed_at, f.c.id).limit(limit)

        async def run() -> list[FailedRow]:
            async with self._auto.connect() as conn:
                return [
                    FailedRow(
                        id=r.id,
                        destination=r.destination,
                        key=r.msg_key,
                        headers=r.headers,
                        body=bytes(r.body),
                        created_at=r.created_at,
                        attempts=r.attempts,
                        reason=r.reason,
                        failed_at=r.failed_at,
                    )
                    for r in await conn.execute(query)
                ]

        return await with_retry(run)

    async def watch(self, wake: Callable[[], None]) -> Watch:
        """PostgreSQL: ``LISTEN`` on the outbox's channel (reconnecting); SQLite: nothing (relays poll)."""
        if not self.postgres:
            return NoWatch()
        watch = PgWatch(self.engine, self.tables.channel, wake)
        await watch.start()
        return watch


def _row(r: Any) -> OutboxRow:
    return OutboxRow(
        id=r.id,
        destination=r.destination,
        key=r.msg_key,
        headers=r.headers,
        body=bytes(r.body),
        created_at=r.created_at,
        deliver_at=r.deliver_at,
        attempts=r.attempts,
    )


def _row_columns(t: Table) -> tuple[Any, ...]:
    """The columns an :class:`OutboxRow` is read from, in its field order."""
    c = t.c
    return (c.id, c.destination, c.msg_key, c.headers, c.body, c.created_at, c.deliver_at, c.attempts)
