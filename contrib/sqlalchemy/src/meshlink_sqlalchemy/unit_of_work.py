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

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncSession

from meshlink.context import Context
from meshlink.events import DuplicateSkipped
from meshlink.outbox.writer import Outbox
from meshlink.pipeline import Handler
from meshlink.resilience.policy import parse_duration

if TYPE_CHECKING:
    from meshlink_sqlalchemy.stores import SqlStores

__all__ = ["UnitOfWork"]


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
        self.key = key

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
            outbox = Outbox(self.stores.outbox, source=self.outbox.source, clock=ctx.clock)
            async with AsyncSession(engine, expire_on_commit=False) as session, session.begin():
                if not await inbox.record(session, key, ttl=self.ttl, now=ctx.clock.time()):
                    ctx.emit(DuplicateSkipped(handler=ctx.handler, message=ctx.message, key=key))
                    return
                ctx.session, ctx.publisher = session, outbox.publisher(session)
                try:
                    await next_(ctx)
                finally:
                    ctx.session, ctx.publisher = None, None

        return in_transaction

    def __repr__(self) -> str:
        return f"UnitOfWork(inbox+outbox in one transaction, ttl={self.ttl:g}s)"
