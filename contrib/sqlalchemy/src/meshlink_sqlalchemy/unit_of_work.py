"""One transaction per message: the inbox record, the handler's writes, its outgoing messages.

::

    stores = SqlStores("postgresql+asyncpg://app@db/app")
    uow = UnitOfWork(stores, source="billing")

    @mesh.handler("orders.placed", unit_of_work=uow, idempotency=None)
    async def charge(event: OrderPlaced, ctx: Context) -> None:
        await ctx.session.execute(insert(payments).values(...))      # the handler's own writes
        await ctx.publish("payments.captured", PaymentCaptured(...))  # → outbox, same transaction

For each message the middleware opens a transaction, records the message's
idempotency key in the inbox (a redelivered duplicate finds it and is acked
without running), exposes the transaction as ``ctx.session`` and routes
``ctx.publish`` into the outbox in it, then commits if the handler returns and
rolls everything back if it raises. A crash at any point leaves all three or
none of them.

Give it as ``unit_of_work=``: the mesh runs it around each *try* (inside the
retry policy), so every immediate retry and every redelivery gets a transaction
of its own and a failed try leaves nothing behind. (As plain ``middleware=`` it
would wrap all tries in one transaction.) Give ``idempotency=None`` too: the
inbox here replaces it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import event, literal, select
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.ext.asyncio import AsyncSession

from meshlink.context import Context
from meshlink.errors import ConfigurationError
from meshlink.events import DuplicateSkipped
from meshlink.outbox.writer import Outbox
from meshlink.pipeline import Handler
from meshlink.resilience.policy import parse_duration
from meshlink_sqlalchemy.engine import is_connection_error

if TYPE_CHECKING:
    from meshlink_sqlalchemy.stores import SqlStores

__all__ = ["UnitOfWork"]

#: Set on a pooled connection's ``info`` when a statement on it raised (see _mark_error).
_ERRORED = "meshlink.statement_failed"
_PROBE = select(literal(1))


def _mark_error(context: ExceptionContext) -> None:
    if context.connection is not None:
        context.connection.info[_ERRORED] = True


class UnitOfWork:
    """Middleware: run each message in one SQL transaction with its inbox record and outbox rows.

    Args:
        stores: the SQL stores (engine, inbox, outbox).
        source: ``ce_source`` of messages the outbox builds (handlers' ``ctx.publish`` already sets it).
        ttl: how long a processed key is remembered.
        key: idempotency key from the decoded payload; default: the message's ``idempotency-key``.
    """

    def __init__(
        self,
        stores: SqlStores,
        *,
        source: str = "meshlink",
        ttl: float | str = "7d",
        key: Callable[[Any], str] | None = None,
    ) -> None:
        self.stores = stores
        self.outbox = Outbox(stores.outbox, source=source)
        self.ttl = parse_duration(ttl, setting="unit_of_work.ttl")
        if self.ttl <= 0:
            raise ConfigurationError("unit_of_work.ttl", f"must be > 0, got {ttl!r}")
        self.key = key
        # A statement that failed inside the transaction (and that the handler caught) leaves a
        # PostgreSQL transaction aborted, and its COMMIT then rolls back without an error: the
        # message would be acked with nothing written. Errors are noted on the connection, and
        # such a transaction is probed before it commits.
        self._postgres = stores.engine.dialect.name == "postgresql"
        if self._postgres and not event.contains(stores.engine.sync_engine, "handle_error", _mark_error):
            event.listen(stores.engine.sync_engine, "handle_error", _mark_error)

    def key_of(self, ctx: Context) -> str:
        """The inbox key of the message in ``ctx`` (per handler, like the idempotency middleware)."""
        if self.key is not None:
            return f"{ctx.handler}:{self.key(ctx.payload)}"
        return f"{ctx.handler}:{ctx.message.idempotency_key}"

    def __call__(self, next_: Handler) -> Handler:
        inbox = self.stores.inbox
        engine = self.stores.engine

        async def in_transaction(ctx: Context) -> None:
            key = self.key_of(ctx)
            token = uuid.uuid4().hex
            outbox = Outbox(self.stores.outbox, source=self.outbox.source, clock=ctx.clock)
            committing = False
            try:
                async with AsyncSession(engine, expire_on_commit=False) as session, session.begin():
                    if self._postgres:
                        (await session.connection()).info.pop(_ERRORED, None)
                    if not await inbox.record(session, key, ttl=self.ttl, now=ctx.clock.time(), token=token):
                        ctx.emit(DuplicateSkipped(handler=ctx.handler, message=ctx.message, key=key))
                        return
                    ctx.session, ctx.publisher = session, outbox.publisher(session)
                    try:
                        await next_(ctx)
                    finally:
                        ctx.session, ctx.publisher = None, None
                    if self._postgres and (await session.connection()).info.get(_ERRORED):
                        await session.execute(_PROBE)  # raises if the transaction is aborted
                    committing = True
            except Exception as exc:
                # the COMMIT reached the database and only its answer was lost: this try's row
                # in the inbox says so (a retry would skip it; the last try must not fail)
                if committing and is_connection_error(exc) and await inbox.recorded(key, token):
                    return
                raise

        return in_transaction

    def __repr__(self) -> str:
        return f"UnitOfWork(inbox+outbox in one transaction, ttl={self.ttl:g}s)"
