"""The SQL inbox: processed message keys, in the same database as the handler's own writes.

Two ways to use it:

* as an :class:`~meshlink.resilience.idempotency.IdempotencyStore`
  (``Idempotency(store=stores.inbox)``): claim, complete and release each run in
  their own short transaction — shared by every replica, but not atomic with the
  handler's writes;
* through :class:`~meshlink_sqlalchemy.unit_of_work.UnitOfWork`, which calls
  :meth:`SqlInbox.record` inside the handler's transaction: the key is recorded
  if and only if the handler's writes and outgoing messages commit.

A key is one row: ``pending`` (claimed, until ``expires_at``) or ``done`` (until
``expires_at``, the TTL). An expired row counts as absent. Inserting a key that
a concurrent, uncommitted transaction has just inserted waits for that
transaction (PostgreSQL unique index; SQLite's single writer), so two
deliveries of one message never both run their effects.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select
from sqlalchemy import update as sql_update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from meshlink.clock import Clock, SystemClock
from meshlink.resilience.idempotency import Claim
from meshlink_sqlalchemy.engine import with_retry
from meshlink_sqlalchemy.tables import Tables

__all__ = ["SqlInbox"]

PENDING, DONE = "pending", "done"


class SqlInbox:
    """Idempotency keys in a SQL table (an ``IdempotencyStore``, plus :meth:`record` for units of work)."""

    def __init__(self, engine: AsyncEngine, tables: Tables, *, clock: Clock | None = None) -> None:
        self.engine = engine
        self.tables = tables
        self.clock: Clock = clock or SystemClock()
        self._t = tables.inbox

    def _upsert(self, key: str, state: str, token: str, expires_at: float, now: float) -> Any:
        """Insert ``key``, or take over its row if that row has expired; rowcount tells which."""
        t = self._t
        values = {"key": key, "state": state, "token": token, "expires_at": expires_at, "created_at": now}
        if self.engine.dialect.name == "postgresql":
            pg = postgresql.insert(t).values(values)
            return pg.on_conflict_do_update(index_elements=[t.c.key], set_=values, where=t.c.expires_at < now)
        lite = sqlite.insert(t).values(values)
        return lite.on_conflict_do_update(index_elements=[t.c.key], set_=values, where=t.c.expires_at < now)

    async def record(
        self, session: Any, key: str, *, ttl: float, now: float | None = None, token: str = ""
    ) -> bool:
        """Record ``key`` as done inside ``session``'s transaction; ``False`` if done or held already.

        ``token`` marks the row as this try's, so that :meth:`recorded` can tell, after a
        COMMIT whose answer was lost, whether it landed.
        """
        at = self.clock.time() if now is None else now
        result = await session.execute(self._upsert(key, DONE, token, at + ttl, at))
        return bool(result.rowcount)

    async def recorded(self, key: str, token: str) -> bool:
        """Whether the try that used ``token`` committed ``key`` (read on a fresh connection)."""
        t = self._t

        async def run() -> bool:
            async with self.engine.connect() as conn:
                row = (await conn.execute(select(t.c.state, t.c.token).where(t.c.key == key))).first()
            return row is not None and row.state == DONE and row.token == token

        return await with_retry(run)

    # -- IdempotencyStore ----------------------------------------------------------------

    async def claim(self, key: str, *, token: str, lease: float) -> Claim:
        """Claim ``key``; a pending row under ``token`` is ours already.

        That happens when a try's COMMIT reached the database but its answer was
        lost: :func:`~meshlink_sqlalchemy.engine.with_retry` runs the claim again
        and finds the row that try wrote.
        """
        t = self._t
        now = self.clock.time()

        async def run() -> Claim:
            async with self.engine.begin() as conn:
                result = await conn.execute(self._upsert(key, PENDING, token, now + lease, now))
                if result.rowcount:
                    return Claim.CLAIMED
                row = (await conn.execute(select(t.c.state, t.c.token).where(t.c.key == key))).first()
            if row is None:  # pragma: no cover - released or purged between the two statements
                return Claim.IN_PROGRESS
            if row.state == DONE:
                return Claim.DONE
            return Claim.CLAIMED if row.token == token else Claim.IN_PROGRESS

        return await with_retry(run)

    async def complete(self, key: str, *, token: str, ttl: float) -> None:
        t = self._t
        statement = (
            sql_update(t)
            .where(t.c.key == key)
            .values(state=DONE, token=token, expires_at=self.clock.time() + ttl)
        )

        async def run() -> None:
            async with self.engine.begin() as conn:
                await conn.execute(statement)

        await with_retry(run)

    async def release(self, key: str, *, token: str) -> None:
        t = self._t
        statement = delete(t).where(t.c.key == key, t.c.token == token, t.c.state == PENDING)

        async def run() -> None:
            async with self.engine.begin() as conn:
                await conn.execute(statement)

        await with_retry(run)

    async def purge(self, *, limit: int = 10_000) -> int:
        """Delete up to ``limit`` expired keys; returns how many."""
        t = self._t
        old = select(t.c.key).where(t.c.expires_at < self.clock.time()).limit(limit)

        async def run() -> int:
            async with self.engine.begin() as conn:
                return int((await conn.execute(delete(t).where(t.c.key.in_(old)))).rowcount)

        return await with_retry(run)
