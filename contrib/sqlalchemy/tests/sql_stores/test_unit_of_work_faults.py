"""The SQL unit of work, the SQL inbox and with_retry under faults: each test failed before its fix.

Faults are injected on progress (a COMMIT that went through, a statement the handler
catches), never on wall time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, func, select, text
from sqlalchemy.exc import IntegrityError

from meshlink import Idempotency, Mesh, Retry
from meshlink.clock import SystemClock
from meshlink.context import Context
from meshlink.resilience.idempotency import IdempotencyMiddleware
from meshlink.testing import MeshHarness
from meshlink_sqlalchemy import SqlStores, UnitOfWork, with_retry

from .test_inbox_claim_retry import LostCommitAnswer


def effects_table(stores: SqlStores) -> Table:
    return Table(
        f"{stores.tables.prefix}effects",
        MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("message_id", String(64), nullable=False, unique=True),
    )


@pytest.fixture
async def effects(stores: SqlStores) -> AsyncIterator[Table]:
    table = effects_table(stores)
    async with stores.engine.begin() as conn:
        await conn.run_sync(table.metadata.create_all)
    yield table
    async with stores.engine.begin() as conn:
        await conn.run_sync(table.metadata.drop_all)


@pytest.fixture
async def pg_effects(pg_stores: SqlStores) -> AsyncIterator[Table]:
    table = effects_table(pg_stores)
    async with pg_stores.engine.begin() as conn:
        await conn.run_sync(table.metadata.create_all)
    yield table
    async with pg_stores.engine.begin() as conn:
        await conn.run_sync(table.metadata.drop_all)


async def count(stores: SqlStores, table: Table) -> int:
    async with stores.engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar() or 0)


# -- 1. a lost COMMIT answer on the last try ---------------------------------------------------


async def test_uow_commit_answer_lost_on_the_last_try_is_recognised_not_dead_lettered(
    stores: SqlStores, effects: Table, memory_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The UoW's COMMIT reaches the database, then the connection drops. The effect, the
    inbox record and the outbox row are committed, so the message was handled; the UoW
    must re-read (the inbox says so) instead of reporting a failure. The Idempotency path
    already does this (test_inbox_claim_retry: ..._is_not_dead_lettered, same policy)."""
    lost = LostCommitAnswer(stores, monkeypatch)
    mesh = Mesh(memory_url, service="billing")
    runs = 0

    @mesh.handler(
        "orders", unit_of_work=UnitOfWork(stores), idempotency=None, retry=Retry(attempts=1, redeliver=[])
    )
    async def charge(body: dict[str, int], ctx: Context) -> None:
        nonlocal runs
        runs += 1
        await ctx.session.execute(effects.insert().values(message_id=ctx.message.id))
        await ctx.publish("payments", {"n": body["n"]}, key="p")
        lost.arm()  # the next COMMIT is this try's

    async with MeshHarness(mesh) as h:
        await h.publish("orders", {"n": 1})
        await h.idle()
        assert lost.fired == 1, "the fault did not happen"
        # committed: effect, inbox record and outgoing row are all in the database ...
        assert await count(stores, effects) == 1
        assert await count(stores, stores.tables.inbox) == 1
        assert len(await stores.outbox.list_pending()) == 1
        # ... so the message must not be dead-lettered as failed
        assert h.dead_lettered == []
        assert len(h.handled) == 1
    assert runs == 1


# -- 2. a handler that catches a database error (PostgreSQL) -------------------------------------


async def test_uow_does_not_ack_a_message_whose_postgres_transaction_was_aborted(
    pg_stores: SqlStores, pg_effects: Table, memory_url: str
) -> None:
    """A handler catches an error from one of its statements and returns. On PostgreSQL the
    transaction is aborted, COMMIT silently becomes ROLLBACK, and the UoW acks the message:
    the effect, the inbox record and the outgoing row are all gone, and nothing retries."""
    stores, effects = pg_stores, pg_effects
    mesh = Mesh(memory_url, service="billing")

    @mesh.handler(
        "orders", unit_of_work=UnitOfWork(stores), idempotency=None, retry=Retry(attempts=1, redeliver=[])
    )
    async def charge(body: dict[str, int], ctx: Context) -> None:
        await ctx.session.execute(effects.insert().values(message_id=ctx.message.id))
        await ctx.publish("payments", {"n": body["n"]}, key="p")
        with contextlib.suppress(IntegrityError):  # an "insert if absent" written as insert-and-catch
            await ctx.session.execute(effects.insert().values(message_id=ctx.message.id))

    async with MeshHarness(mesh) as h:
        await h.publish("orders", {"n": 1})
        await h.idle()
        acked = len(h.handled) == 1
    committed = (
        await count(stores, effects),
        await count(stores, stores.tables.inbox),
        len(await stores.outbox.list_pending()),
    )
    if acked:
        assert committed == (1, 1, 1), f"acked as handled, but its transaction committed {committed}"
    else:
        assert committed == (0, 0, 0)


# -- 3. a claim whose COMMIT went through, then the try was cancelled -----------------------------


async def test_a_claim_committed_then_cancelled_is_released_so_a_retry_can_run(
    stores: SqlStores, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Idempotency(store=stores.inbox): the claim's COMMIT is done when the try is cancelled
    (a drain at shutdown). The claim stays PENDING under the cancelled try's token, so the
    redelivery gets DuplicateInProgressError until the lease (5 min by default) runs out."""
    dialect = stores.engine.dialect
    commit = dialect.do_commit
    cancel_after_commit: list[asyncio.Task[Any]] = []

    def do_commit(dbapi_connection: Any) -> None:
        commit(dbapi_connection)  # the claim is in the database
        if cancel_after_commit:
            cancel_after_commit.pop().cancel()  # delivered at the next await of this task

    monkeypatch.setattr(dialect, "do_commit", do_commit)
    middleware = IdempotencyMiddleware(Idempotency(store=stores.inbox))
    runs = 0

    async def handler(ctx: Any) -> None:
        nonlocal runs
        runs += 1

    def ctx() -> Any:
        message = SimpleNamespace(idempotency_key="m1", id="m1")
        return SimpleNamespace(
            handler="h", message=message, payload=None, clock=SystemClock(), emit=lambda e: None
        )

    async def first_try() -> None:
        task = asyncio.current_task()
        assert task is not None
        cancel_after_commit.append(task)
        await middleware(handler)(ctx())

    with pytest.raises(asyncio.CancelledError):
        await asyncio.create_task(first_try())
    assert not cancel_after_commit, "the fault did not happen"
    assert runs == 0

    await middleware(handler)(ctx())  # the redelivery: must run, not find the key in progress
    assert runs == 1


# -- 4. with_retry and SQLite errors that only mention "locked" -----------------------------------


async def test_with_retry_does_not_retry_a_sqlite_error_that_only_mentions_locked(
    sqlite_stores: SqlStores,
) -> None:
    """is_connection_error matches the substring "locked" anywhere in an OperationalError, so
    "no such table: blocked_inbox" (e.g. a store with table_prefix=blocked_ before db init)
    is retried five times as if the database were busy."""
    calls = 0

    async def op() -> None:
        nonlocal calls
        calls += 1
        async with sqlite_stores.engine.connect() as conn:
            await conn.execute(text("SELECT * FROM blocked_inbox"))

    with pytest.raises(Exception, match="no such table"):
        await with_retry(op)
    assert calls == 1
