"""The saga stores and GroupCommit under faults: each test failed before its fix."""

from __future__ import annotations

import asyncio

from meshlink.message import Message
from meshlink.saga import MemorySagaStore, SagaInstance, SagaStatus
from meshlink.saga.commit import GroupCommit
from meshlink.saga.contract import NOW, command, instance
from meshlink_sqlalchemy import SqlSagaInstanceStore, SqlStores

# -- 1. GroupCommit: a flusher cancelled before its first batch leaves its waiters hanging -------------


async def test_group_commit_waiter_does_not_hang_when_the_flusher_is_cancelled_before_its_first_batch() -> (
    None
):
    commit = GroupCommit(MemorySagaStore())
    waiter = asyncio.ensure_future(commit.save(instance("a")))
    await asyncio.sleep(0)  # save() ran: its pending is queued and the flusher task created, not yet run
    (flusher,) = [t for t in asyncio.all_tasks() if t.get_name() == "saga group commit"]
    flusher.cancel()  # e.g. the coordinator stopping; lands on the flusher's `await asyncio.sleep(0)`
    done, _ = await asyncio.wait({waiter}, timeout=1.0)
    try:
        assert waiter in done, "the waiter hangs: its future is never resolved nor cancelled"
    finally:
        waiter.cancel()


# -- 2. memory store: one transition's failing publish fails (and drops the commands of) the others ----


async def test_memory_store_one_failing_publish_does_not_fail_or_lose_another_sagas_transition() -> None:
    published: list[str] = []

    async def publish(destination: str, message: Message) -> None:
        if destination == "broken":
            raise ConnectionError("no route to broken")
        published.append(destination)

    store = MemorySagaStore(publish=publish)
    commit = GroupCommit(store)
    bad_cmd = ("broken", Message(body=b"1", type="X"))
    ok_cmd = ("inventory.reserve", Message(body=b"2", type="X"))
    results = await asyncio.gather(
        commit.save(instance("a"), [bad_cmd]), commit.save(instance("b"), [ok_cmd]), return_exceptions=True
    )
    # b's transition was saved; its caller must be told so and its command must go out
    saved_b = await store.load("b")
    assert saved_b is not None
    assert saved_b.version == 1
    assert isinstance(results[1], SagaInstance), f"b was saved but its caller got {results[1]!r}"
    assert published == ["inventory.reserve"], "b's command was lost"


# -- 3. SQL store: one transition the database refuses fails every other transition of the batch -------


async def test_sql_one_refused_transition_does_not_fail_the_others_in_its_group_commit(
    pg_stores: SqlStores,
) -> None:
    store = SqlSagaInstanceStore(pg_stores)
    commit = GroupCommit(store)
    too_long = "x" * 200  # saga_id is VARCHAR(128); coordinator.start accepts any caller-given id
    results = await asyncio.gather(
        commit.save(instance("ok"), [command(1)]), commit.save(instance(too_long)), return_exceptions=True
    )
    assert isinstance(results[0], SagaInstance), f"'ok' failed because of another saga: {results[0]!r}"
    assert (await store.load("ok")) is not None


# -- 5. due(): finished sagas must not take up the limit ------------------------------------------


async def _due_ids(store: object) -> list[str]:
    """A finished saga with a wake_at (old data, or a direct store user) and an unfinished one
    whose wake_at passed: due() with a limit of one must name the unfinished one."""
    s = store
    done = await s.save(instance("done", wake_at=NOW - 20))  # type: ignore[attr-defined]
    await s.save(done.evolve(status=SagaStatus.COMPLETED))  # type: ignore[attr-defined]
    await s.save(instance("late", wake_at=NOW - 10))  # type: ignore[attr-defined]
    return [i.saga_id for i in await s.due(NOW, limit=1)]  # type: ignore[attr-defined]


async def test_due_returns_the_unfinished_saga_whose_wake_at_passed_not_a_finished_one(
    stores: SqlStores,
) -> None:
    assert await _due_ids(MemorySagaStore()) == ["late"]
    assert await _due_ids(SqlSagaInstanceStore(stores)) == ["late"], "SQL due() ignores status"


# -- 6. find(): "newest first" means creation on memory, last change on SQL -----------------------------


async def _find_ids(store: object) -> list[str]:
    s = store
    old = await s.save(instance("old"))  # type: ignore[attr-defined]
    await s.save(instance("new").evolve(created_at=NOW + 1, updated_at=NOW + 1))  # type: ignore[attr-defined]
    await s.save(old.evolve(updated_at=NOW + 5).log(NOW + 5, "a", "sent"))  # type: ignore[attr-defined]
    return [i.saga_id for i in await s.find()]  # type: ignore[attr-defined]


async def test_find_orders_alike_on_memory_and_sql(stores: SqlStores) -> None:
    assert await _find_ids(SqlSagaInstanceStore(stores)) == await _find_ids(MemorySagaStore())
