"""The SQL outbox store (SQLAlchemy 2 async Core), on PostgreSQL and SQLite.

Claiming is one statement (CTEs plus ``UPDATE … RETURNING``)::

    WITH key_heads AS (        -- each key's earliest unsent row
        SELECT min(id) FROM outbox WHERE sent_at IS NULL AND msg_key IS NOT NULL GROUP BY msg_key),
    free_heads AS (            -- claimable heads (and keyless rows) under no live lease
        SELECT id, msg_key FROM outbox
        WHERE sent_at IS NULL AND <no live lease> AND <retry due> AND (msg_key IS NULL OR id IN key_heads)
        ORDER BY id LIMIT :n
        FOR UPDATE SKIP LOCKED)                 -- PostgreSQL; SQLite runs statements one at a time
    UPDATE outbox SET claimed_by = :relay, lease_until = :now + :lease
    WHERE id IN (SELECT id FROM outbox WHERE sent_at IS NULL AND id <> ALL(:exclude)
                 AND (id IN free_heads OR msg_key IN free_heads.msg_key
                      OR msg_key IN <keys whose head :relay holds under a live lease>
                      OR <keyless and :relay's under a live lease>)
                 ORDER BY id LIMIT :n)
    RETURNING …

A relay gets a key's rows only through the key's head, which it must lock (a
concurrent claimer skips a locked head and so the whole key) and which stays
leased while the relay works. So two relays never hold rows of one key, and the
holder has a prefix of the key's rows. Heads the relay already holds are not
locked (nobody else may take them, and the relay may be marking them sent on
another connection): the relay gets their keys' later rows, except those in
``exclude`` (its rows in flight). Settling statements (``mark_sent``,
``release``) are single autocommit statements; each operation is retried on
connection-class errors (a terminated backend, a restart), which is safe
because each is idempotent for the relay that holds the rows.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Sequence
from operator import attrgetter
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
    exists,
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
        relay_engine: an engine for the relay's own operations (claim, mark, release,
            stats…), e.g. one without ``pool_pre_ping`` (see :class:`SqlStores`);
            ``engine`` by default.
    """

    def __init__(
        self, engine: AsyncEngine, tables: Tables, *, relay_engine: AsyncEngine | None = None
    ) -> None:
        self.engine = engine
        self.tables = tables
        self.postgres = engine.dialect.name == "postgresql"
        self.relay_engine = relay_engine or engine
        self._auto = self.relay_engine.execution_options(isolation_level="AUTOCOMMIT")
        self._t = tables.outbox

    def _ids_match(self, ids: Sequence[int]) -> ColumnElement[bool]:
        if self.postgres:  # one array parameter: the same prepared statement whatever the count
            return self._t.c.id == any_(bindparam("ids", list(ids), type_=ARRAY(BigInteger)))
        return self._t.c.id.in_(list(ids))

    def _id_set(self, ids: Collection[int], name: str) -> Any:
        """``ids`` for ``IN``/``NOT IN``: on PostgreSQL one array parameter, unnested so that it is hashed."""
        if self.postgres:
            return select(func.unnest(bindparam(name, list(ids), type_=ARRAY(BigInteger))))
        return list(ids)

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

    def _claim_statement(
        self, relay: str, limit: int, lease: float, now: float, exclude: Collection[int] = ()
    ) -> Any:
        """One statement: lock the first free rows, keep those whose key has nothing earlier
        in someone else's way, lease them to ``relay``.

        A row may be claimed when every earlier unsent row of its key is either locked by
        this statement too or held by this relay (in flight: the relay publishes a key's
        rows in order and only after the earlier ones are confirmed). The rows are found
        from the head of the unsent-id index (``LIMIT`` rows, skipping locked ones) and
        each is checked by one probe of the (key, id) index of unsent rows, so a claim
        costs the same whatever the backlog behind it (a scan of every unsent row per
        claim made the relay slower the more it had to do).
        """
        t, now = self._t, float(now)
        earlier = t.alias("earlier")
        free = [
            t.c.sent_at.is_(None),
            # under no live lease, or leased to this relay and not in flight (a claim whose
            # answer was lost): taken again, else its key would wait for the lease to expire
            or_(t.c.lease_until.is_(None), t.c.lease_until < now, t.c.claimed_by == relay),
            or_(t.c.retry_at.is_(None), t.c.retry_at <= now),
        ]
        if exclude:  # in flight: leases stay as they are
            free.append(t.c.id.not_in(self._id_set(exclude, "exclude")))
        # A row behind an earlier one of its key that is waiting for its retry, or leased to
        # another relay, cannot be taken: it is left out *before* the LIMIT, or such rows
        # would fill the LIMIT and keep every other key's rows from being claimed.
        blocker = t.alias("blocker")
        free.append(
            or_(
                t.c.msg_key.is_(None),
                ~exists(
                    select(blocker.c.id).where(
                        blocker.c.msg_key == t.c.msg_key,
                        blocker.c.id < t.c.id,
                        blocker.c.sent_at.is_(None),
                        or_(
                            blocker.c.retry_at > now,
                            and_(
                                blocker.c.lease_until >= now,
                                or_(blocker.c.claimed_by.is_(None), blocker.c.claimed_by != relay),
                            ),
                        ),
                    )
                ),
            )
        )
        # locked, so that two claimers never both take a row; SKIP LOCKED: another claimer's
        # rows (and rows being marked sent) are passed over, and then block their keys below
        locked = (
            select(t.c.id, t.c.msg_key)
            .where(*free)
            .order_by(t.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True, of=t)
            .cte("locked")
        )
        held_elsewhere = and_(
            earlier.c.msg_key == locked.c.msg_key,
            earlier.c.id < locked.c.id,
            earlier.c.sent_at.is_(None),
            earlier.c.id.not_in(select(locked.c.id)),
            # not this relay's own live lease (written so that NULLs count as "not held")
            or_(
                earlier.c.claimed_by.is_(None),
                earlier.c.claimed_by != relay,
                earlier.c.lease_until.is_(None),
                earlier.c.lease_until < now,
            ),
        )
        picked: Select[Any] = select(locked.c.id).where(
            or_(locked.c.msg_key.is_(None), ~exists(select(earlier.c.id).where(held_elsewhere)))
        )
        return (
            sql_update(t)
            .where(t.c.id.in_(picked))
            .values(claimed_by=relay, lease_until=now + lease)
            .returning(*_row_columns(t))
        )

    async def claim(
        self, relay: str, *, limit: int, lease: float, now: float, exclude: Collection[int] = ()
    ) -> list[OutboxRow]:
        statement = self._claim_statement(relay, limit, lease, now, exclude)

        async def run() -> list[OutboxRow]:
            async with self._auto.connect() as conn:
                result = await conn.execute(statement)
                rows = [_row(r) for r in result]
            rows.sort(key=_ID)
            return rows

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
            async with self.relay_engine.begin() as conn:
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


_ID = attrgetter("id")


def _row(r: tuple[Any, ...]) -> OutboxRow:
    """An :class:`OutboxRow` from the values of :func:`_row_columns`, in that order."""
    row_id, destination, key, headers, body, created_at, deliver_at, attempts = r
    return OutboxRow(
        id=row_id,
        destination=destination,
        key=key,
        headers=headers,
        body=body if body.__class__ is bytes else bytes(body),
        created_at=created_at,
        deliver_at=deliver_at,
        attempts=attempts,
    )


def _row_columns(t: Table) -> tuple[Any, ...]:
    """The columns an :class:`OutboxRow` is read from, in its field order."""
    c = t.c
    return (c.id, c.destination, c.msg_key, c.headers, c.body, c.created_at, c.deliver_at, c.attempts)
