"""The SQL store family on one database, built from a URL (the ``meshlink.stores`` entry point)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from meshlink.clock import Clock
from meshlink_sqlalchemy.engine import make_engine, parse_store_url
from meshlink_sqlalchemy.inbox import SqlInbox
from meshlink_sqlalchemy.outbox import SqlOutboxStore
from meshlink_sqlalchemy.saga import SqlSagaStore
from meshlink_sqlalchemy.tables import Tables, build_tables

__all__ = ["SqlStores"]


class SqlStores:
    """Outbox, inbox and saga stores sharing one engine.

    Args:
        url: ``postgresql+asyncpg://…`` or ``sqlite+aiosqlite:///path.db``, optionally with
            ``?table_prefix=…&schema=…`` (see :mod:`meshlink_sqlalchemy.engine`).
        engine: use this engine instead of making one from ``url`` (tables still from ``url``'s options).
        clock: time source of the inbox and saga stores.
        engine_options: keyword options for ``create_async_engine``.
    """

    def __init__(
        self,
        url: str,
        *,
        engine: AsyncEngine | None = None,
        clock: Clock | None = None,
        **engine_options: Any,
    ) -> None:
        parsed = parse_store_url(url)
        self.engine: AsyncEngine = engine or make_engine(parsed.url, **engine_options)
        self.tables: Tables = build_tables(parsed.prefix, schema=parsed.schema)
        # The relay's operations get a small pool of their own on PostgreSQL, without
        # pool_pre_ping: on asyncpg a pre-ping is three round trips per checkout (a sixth of
        # the relay's time), and each relay operation already runs under with_retry, which
        # retries a lost connection on a new one. The application's engine keeps pre-ping.
        self._relay_engine: AsyncEngine | None = None
        if engine is None and self.engine.dialect.name == "postgresql":
            # JIT off: the claim's correlated NOT EXISTS is estimated high enough to cross
            # jit_above_cost, and compiling it cost ~18 ms per claim against ~1 ms of work
            connect_args = {**engine_options.get("connect_args", {})}
            connect_args["server_settings"] = {**connect_args.get("server_settings", {}), "jit": "off"}
            relay_options = {
                "pool_size": 3,
                "max_overflow": 2,
                **engine_options,
                "pool_pre_ping": False,
                "connect_args": connect_args,
            }
            self._relay_engine = make_engine(parsed.url, **relay_options)
        self._outbox = SqlOutboxStore(self.engine, self.tables, relay_engine=self._relay_engine)
        self.inbox = SqlInbox(self.engine, self.tables, clock=clock)
        self.sagas = SqlSagaStore(self.engine, self.tables, clock=clock)

    @property
    def outbox(self) -> SqlOutboxStore:
        """The outbox store."""
        return self._outbox

    async def init(self) -> None:
        """Create the schema (PostgreSQL), the tables and the notification trigger, if missing."""
        async with self.engine.begin() as conn:
            if self.tables.schema and self.engine.dialect.name == "postgresql":
                await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{self.tables.schema}"'))
            await conn.run_sync(self.tables.metadata.create_all)

    async def drop(self) -> None:
        """Drop every table of this store (tests and tear-downs)."""
        async with self.engine.begin() as conn:
            await conn.run_sync(self.tables.metadata.drop_all)

    async def close(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()
        if self._relay_engine is not None:
            await self._relay_engine.dispose()
